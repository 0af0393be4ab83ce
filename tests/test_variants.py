"""Batch norm as practitioners use it: PyTorch parity, batch renorm, ghost batch norm, precise
statistics, folding, and the peers' extras (several layer-norm axes, 1-D/3-D group norm, masks for
layer/group norm, a traced dropout rate)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import nets, reference, testing, torch_compat

from helpers import rand

D = 4


def _params(d=D, dtype=jnp.float64):
    return rand(1, (d,), dtype, scale=0.5, offset=1.0), rand(2, (d,), dtype)


# --- PyTorch parity ---------------------------------------------------------------------------

def _torch_running_update(batches, torch_momentum, rm, rv):
    """PyTorch's documented update, in numpy: unbiased batch variance, momentum weighting the
    new batch, None = cumulative average with num_batches_tracked."""
    for t, x in enumerate(batches, start=1):
        m = x.shape[0]
        factor = 1.0 / t if torch_momentum is None else torch_momentum
        rm = (1 - factor) * rm + factor * x.mean(0)
        rv = (1 - factor) * rv + factor * x.var(0) * m / (m - 1)
    return rm, rv


@pytest.mark.parametrize("torch_momentum", [0.1, 0.3, None])
def test_running_statistics_reproduce_pytorch_over_several_steps(torch_momentum):
    batches = [np.asarray(rand(i, (6 + i, D), scale=1 + i, offset=i)) for i in range(4)]
    state = jaxbn.init_batch_norm_state(D, jnp.float64)
    gamma, beta = _params()
    momentum = torch_compat.momentum_from_torch(torch_momentum)
    for x in batches:
        _, state = jaxbn.batch_norm(jnp.asarray(x), gamma, beta, state, train=True,
                                    momentum=momentum, running_var="unbiased")
    rm, rv = _torch_running_update(batches, torch_momentum, np.zeros(D), np.ones(D))
    np.testing.assert_allclose(state.mean, rm, rtol=1e-12)
    np.testing.assert_allclose(state.var, rv, rtol=1e-12)
    assert int(state.count) == 4


def test_reproduces_pytorch_itself_when_installed():
    if os.environ.get("JAXBN_REQUIRE_TORCH"):  # CI's second job installs torch==2.13.0
        import torch
    else:
        torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(3, momentum=0.2).double()
    gamma, beta, state = torch_compat.from_state_dict(bn.state_dict())
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
    for i in range(3):
        x = np.array(rand(i, (4, 3, 5, 5), scale=2, offset=i))  # writable, as torch wants
        y_torch = bn(torch.from_numpy(x)).detach().numpy()
        y, state = jaxbn.spatial_batch_norm(jnp.asarray(x), gamma.astype(jnp.float64),
                                            beta.astype(jnp.float64), state, train=True,
                                            momentum=torch_compat.momentum_from_torch(0.2),
                                            running_var="unbiased", eps=bn.eps)
        np.testing.assert_allclose(y, y_torch, rtol=1e-10, atol=1e-10)
    back = torch_compat.to_state_dict(gamma, beta, state)
    np.testing.assert_allclose(back["running_var"], bn.running_var.numpy(), rtol=1e-6)
    assert int(back["num_batches_tracked"]) == int(bn.num_batches_tracked) == 3


def test_state_dict_round_trip_and_tensor_like_values():
    class Tensor:  # what from_state_dict needs of a torch tensor, without torch
        def __init__(self, a):
            self.a = np.asarray(a)

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    sd = {"bn.weight": Tensor([1.0, 2.0]), "bn.bias": Tensor([0.5, -0.5]),
          "bn.running_mean": Tensor([0.1, 0.2]), "bn.running_var": Tensor([1.5, 2.5]),
          "bn.num_batches_tracked": Tensor(7)}
    gamma, beta, state = torch_compat.from_state_dict(sd, prefix="bn.")
    np.testing.assert_allclose(gamma, [1.0, 2.0])
    np.testing.assert_allclose(beta, [0.5, -0.5])
    np.testing.assert_allclose(state.mean, [0.1, 0.2])
    np.testing.assert_allclose(state.var, [1.5, 2.5])
    assert int(state.count) == 7
    back = torch_compat.to_state_dict(gamma, beta, state, prefix="bn.")
    for k, v in sd.items():
        np.testing.assert_allclose(back[k], v.a, rtol=1e-7)
    no_affine = torch_compat.from_state_dict({k[3:]: v for k, v in sd.items()
                                              if "running" in k or "tracked" in k})
    assert no_affine[0] is None and no_affine[1] is None
    with pytest.raises(KeyError, match="running_mean"):
        torch_compat.from_state_dict({"weight": np.ones(2)})


def test_state_dict_conversion_shares_no_memory_either_way():
    """A converted state must not change when the source changes in place afterwards (a torch
    train-mode forward updates running_mean in place; ``weight.mul_`` scales gamma)."""
    sd = {"weight": np.array([1.0, 2.0], np.float32), "bias": np.array([0.5, -0.5], np.float32),
          "running_mean": np.zeros(2, np.float32), "running_var": np.ones(2, np.float32)}
    gamma, beta, state = torch_compat.from_state_dict(sd)
    for v in sd.values():
        v *= 3.0
        v += 0.3
    np.testing.assert_array_equal(gamma, [1.0, 2.0])
    np.testing.assert_array_equal(beta, [0.5, -0.5])
    np.testing.assert_array_equal(state.mean, [0.0, 0.0])
    np.testing.assert_array_equal(state.var, [1.0, 1.0])
    back = torch_compat.to_state_dict(gamma, beta, state)
    for v in back.values():
        assert v.flags.writeable
        v += 1  # the arrays (and tensors torch.from_numpy makes of them) are the caller's
    np.testing.assert_array_equal(gamma, [1.0, 2.0])
    np.testing.assert_array_equal(state.var, [1.0, 1.0])


def test_state_dict_of_real_tensors_is_immune_to_later_in_place_updates():
    if os.environ.get("JAXBN_REQUIRE_TORCH"):  # CI's second job installs torch==2.13.0
        import torch
    else:
        torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm2d(3)
    gamma, beta, state = torch_compat.from_state_dict(bn.state_dict())
    bn.train()
    bn(torch.randn(4, 3, 5, 5) + 3.0)  # updates running_mean / running_var in place
    with torch.no_grad():
        bn.weight.mul_(3.0)
    np.testing.assert_array_equal(state.mean, np.zeros(3))
    np.testing.assert_array_equal(state.var, np.ones(3))
    np.testing.assert_array_equal(gamma, np.ones(3))
    assert int(state.count) == 0
    module = torch.nn.BatchNorm2d(3)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in
                            torch_compat.to_state_dict(gamma, beta, state).items()})
    module.train()
    module(torch.randn(4, 3, 5, 5) + 3.0)
    np.testing.assert_array_equal(state.mean, np.zeros(3))


def test_momentum_conversion_and_its_hint():
    assert torch_compat.momentum_from_torch(0.1) == pytest.approx(0.9)
    assert torch_compat.momentum_to_torch(0.9) == pytest.approx(0.1)
    assert torch_compat.momentum_from_torch(None) is None
    with pytest.raises(ValueError, match="jaxbn_momentum = 1 - torch_momentum"):
        torch_compat.momentum_from_torch(1.5)
    with pytest.raises(TypeError, match="torch_momentum"):
        torch_compat.momentum_from_torch("0.1")


@pytest.mark.parametrize("missing", ["gamma", "beta", "both"])
def test_no_affine_part(missing):
    x = rand(0, (8, D))
    gamma, beta = _params()
    g = None if missing in ("gamma", "both") else gamma
    b = None if missing in ("beta", "both") else beta
    state = jaxbn.init_batch_norm_state(D, jnp.float64)
    y, _ = jaxbn.batch_norm(x, g, b, state, train=True)
    y_ref = reference.batch_norm_train(x, gamma if g is not None else jnp.ones(D),
                                       beta if b is not None else jnp.zeros(D))[0]
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    args = [a for a in (g, b) if a is not None]
    fn = lambda x, *p: jaxbn.batch_norm(x, *_fill(missing, p), state, train=True)[0]

    def ref(x, *p):  # the missing parameter is the constant 1 (scale) or 0 (shift)
        gamma_, beta_ = _fill(missing, p)
        return reference.batch_norm_train(x, jnp.ones(D) if gamma_ is None else gamma_,
                                          jnp.zeros(D) if beta_ is None else beta_)[0]

    testing.check_vjp(fn, ref, x, *args)  # the VJPs of x and of the parameters that are there


def _fill(missing, present):
    present = list(present)
    gamma = None if missing in ("gamma", "both") else present.pop(0)
    beta = None if missing in ("beta", "both") else present.pop(0)
    return gamma, beta


# --- batch renormalization --------------------------------------------------------------------

def _renorm_args(dtype=jnp.float64):
    x = rand(0, (16, D), dtype, scale=2.0, offset=0.5)
    # Running statistics far from the batch's: r and d clip for some features, not for others.
    running = (jnp.asarray([0.4, 3.0, -2.0, 0.5], dtype), jnp.asarray([4.0, 0.5, 9.0, 3.9], dtype))
    return x, *_params(D, dtype), jaxbn.BatchNormState(*running)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["alt", "graph", "autodiff"])
def test_renorm_vjp_matches_the_naive_forward(backward):
    x, gamma, beta, state = _renorm_args()
    renorm = dict(r_max=1.5, d_max=0.5)
    fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, renorm=renorm,
                                          backward=backward)[0]
    ref = lambda x, g, b: reference.batch_renorm_train(x, g, b, state.mean, state.var,
                                                       r_max=1.5, d_max=0.5)
    testing.check_vjp(fn, ref, x, gamma, beta)
    x32 = [a.astype(jnp.float32) for a in (x, gamma, beta)]
    testing.check_vjp(fn, ref, *x32, reference_dtype=jnp.float64, reduction_size=16)
    testing.check_transforms(fn, x, gamma, beta)
    # No finite differences: the paper's gradient holds r and d constant, so it is deliberately
    # not the derivative of the forward where they clip and vary with x.


def test_renorm_with_r_max_1_and_d_max_0_is_batch_norm_to_the_bit(monkeypatch):
    # Renorm runs the jnp rules (its statistics are corrected before normalizing), so it is
    # compared with batch norm's jnp rule; the native kernels agree with that rule to rounding
    # (tests/test_native.py).
    monkeypatch.setenv("JAXBN_NATIVE", "0")
    x, gamma, beta, state = _renorm_args(jnp.float32)
    plain = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True)
    renorm = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True,
                                              renorm=dict(r_max=1.0, d_max=0.0))
    cot = (rand(5, x.shape, jnp.float32), jax.tree.map(jnp.zeros_like, state))
    (y1, s1), pull1 = jax.vjp(plain, x, gamma, beta)
    (y2, s2), pull2 = jax.vjp(renorm, x, gamma, beta)
    for a, b in zip(jax.tree.leaves((y1, s1, pull1(cot))), jax.tree.leaves((y2, s2, pull2(cot)))):
        np.testing.assert_array_equal(a, b)


def test_renorm_limits_can_be_traced_and_ramped():
    x, gamma, beta, state = _renorm_args()

    @jax.jit
    def step(r_max, d_max):
        return jaxbn.batch_norm(x, gamma, beta, state, train=True,
                                renorm=dict(r_max=r_max, d_max=d_max))[0]

    for r_max, d_max in ((1.0, 0.0), (2.0, 1.0), (3.0, 5.0)):
        expected = reference.batch_renorm_train(x, gamma, beta, state.mean, state.var,
                                                r_max=r_max, d_max=d_max)
        np.testing.assert_allclose(step(r_max, d_max), expected, rtol=1e-12, atol=1e-12)


# --- ghost batch norm -------------------------------------------------------------------------

def _ghost_reference(x, gamma, beta, k):
    groups = [reference.batch_norm_train(x[i:i + k], gamma, beta)[0]
              for i in range(0, x.shape[0], k)]
    return jnp.concatenate(groups)


@pytest.mark.slow
@pytest.mark.parametrize("backward", ["alt", "graph"])
def test_ghost_batch_norm_is_batch_norm_per_virtual_batch(backward):
    x = rand(0, (12, D), scale=2.0, offset=1.0)
    gamma, beta = _params()
    state = jaxbn.init_batch_norm_state(D, jnp.float64)
    fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, virtual_batch_size=4,
                                          backward=backward)[0]
    testing.check_vjp(fn, lambda x, g, b: _ghost_reference(x, g, b, 4), x, gamma, beta)
    testing.check_transforms(fn, x, gamma, beta)
    _, new = jaxbn.batch_norm(x, gamma, beta, state, train=True, virtual_batch_size=4,
                              momentum=0.0)
    groups = np.asarray(x).reshape(3, 4, D)
    np.testing.assert_allclose(new.mean, groups.mean(1).mean(0), rtol=1e-12)
    np.testing.assert_allclose(new.var, groups.var(1).mean(0), rtol=1e-12)


def test_ghost_with_the_whole_batch_is_batch_norm_and_spatial_works():
    x = rand(0, (6, D))
    gamma, beta = _params()
    state = jaxbn.init_batch_norm_state(D, jnp.float64)
    a = jaxbn.batch_norm(x, gamma, beta, state, train=True, virtual_batch_size=6)
    b = jaxbn.batch_norm(x, gamma, beta, state, train=True)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    xs = rand(3, (8, 3, 2, 2))
    y, _ = jaxbn.spatial_batch_norm(xs, jnp.ones(3), jnp.zeros(3),
                                    jaxbn.init_batch_norm_state(3, jnp.float64), train=True,
                                    virtual_batch_size=2)
    first = np.asarray(xs[:2]).transpose(0, 2, 3, 1).reshape(-1, 3)
    expected = (first - first.mean(0)) / np.sqrt(first.var(0) + 1e-5)
    np.testing.assert_allclose(np.asarray(y[:2]).transpose(0, 2, 3, 1).reshape(-1, 3), expected,
                               rtol=1e-10, atol=1e-10)


# --- precise statistics and folding -------------------------------------------------------------

def test_precise_statistics_are_the_population_statistics_of_the_stream():
    params, state = nets.init_mlp(jax.random.key(0), 5, [7, 6], 3, normalization="batchnorm",
                                  dtype=jnp.float64)
    batches = [rand(i, (10, 5), offset=3.0 * i) for i in range(4)]  # batch means differ a lot
    precise = jaxbn.recompute_batch_stats(nets.apply_mlp, params, state, batches)
    h = np.concatenate([np.asarray(b @ params["W1"] + params["b1"]) for b in batches])
    np.testing.assert_allclose(precise.batch_norm[0].mean, h.mean(0), rtol=1e-10)
    np.testing.assert_allclose(precise.batch_norm[0].var, h.var(0), rtol=1e-10)
    # Layer 2's input is a train-mode function of each batch alone: recompute it per batch.
    seconds = []
    for b in batches:
        h1 = reference.batch_norm_train(b @ params["W1"] + params["b1"], params["gamma1"],
                                        params["beta1"])[0]
        seconds.append(np.asarray(jax.nn.relu(h1) @ params["W2"] + params["b2"]))
    h2 = np.concatenate(seconds)
    np.testing.assert_allclose(precise.batch_norm[1].mean, h2.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(precise.batch_norm[1].var, h2.var(0), rtol=1e-9)
    assert jax.tree.structure(precise) == jax.tree.structure(state)


def test_precise_statistics_of_any_function_threading_a_state():
    def apply(params, state, x, *, train, key=None):
        y, bn = jaxbn.batch_norm(x * params, jnp.ones(3), jnp.zeros(3), state["bn"], train=train,
                                 momentum=None)
        return y, {"bn": bn, "other": state["other"]}

    state = {"bn": jaxbn.init_batch_norm_state(3, jnp.float64), "other": jnp.arange(2.0)}
    batches = [(rand(i, (5, 3), offset=i), None) for i in range(3)]
    out = jaxbn.recompute_batch_stats(apply, 2.0, state, batches)
    xs = 2.0 * np.concatenate([np.asarray(b[0]) for b in batches])
    np.testing.assert_allclose(out["bn"].mean, xs.mean(0), rtol=1e-12)
    np.testing.assert_allclose(out["bn"].var, xs.var(0), rtol=1e-12)
    np.testing.assert_array_equal(out["other"], state["other"])
    with pytest.raises(ValueError, match="at least one batch"):
        jaxbn.recompute_batch_stats(apply, 2.0, state, [])


@pytest.mark.parametrize("kernel_layout", ["dense", "OIHW", "HWIO"])
def test_folding_is_exact(kernel_layout):
    d_out = 5
    state = jaxbn.BatchNormState(rand(3, (d_out,)), rand(4, (d_out,)) ** 2 + 0.5)
    gamma, beta = _params(d_out)
    if kernel_layout == "dense":
        x, w, b = rand(0, (6, 7)), rand(1, (7, d_out)), rand(2, (d_out,))
        layer = lambda w, b: x @ w + b
        bn = lambda h: jaxbn.batch_norm(h, gamma, beta, state, train=False)[0]
    else:
        x = rand(0, (2, 3, 6, 6))
        w = rand(1, (d_out, 3, 3, 3) if kernel_layout == "OIHW" else (3, 3, 3, d_out))
        b = rand(2, (d_out,))
        layer = lambda w, b: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NCHW", kernel_layout, "NCHW")) + \
            b.reshape(1, -1, 1, 1)
        bn = lambda h: jaxbn.spatial_batch_norm(h, gamma, beta, state, train=False)[0]
    w2, b2 = jaxbn.fold_batch_norm(w, b, gamma, beta, state, kernel_layout=kernel_layout)
    np.testing.assert_allclose(layer(w2, b2), bn(layer(w, b)), rtol=1e-12, atol=1e-12)


# --- the peers' extras ----------------------------------------------------------------------------

@pytest.mark.parametrize("backward", ["alt", "graph"])
def test_layer_norm_over_several_trailing_axes(backward):
    x = rand(0, (3, 4, 5), scale=2.0, offset=1.0)
    gamma, beta = rand(1, (4, 5), offset=1.0), rand(2, (4, 5))
    fn = lambda x, g, b: jaxbn.layer_norm(x, g, b, normalized_ndim=2, backward=backward)
    testing.check_vjp(fn, lambda x, g, b: reference.layer_norm(x, g, b), x, gamma, beta)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4, 5\)"):
        jaxbn.layer_norm(x, gamma[0], beta[0], normalized_ndim=2)


@pytest.mark.parametrize("layout,shape", [("NCW", (2, 6, 5)), ("NWC", (2, 5, 6)),
                                          ("NCDHW", (2, 6, 2, 3, 2)), ("NDHWC", (2, 2, 3, 2, 6))])
def test_group_norm_on_1d_and_3d_data(layout, shape):
    x = rand(0, shape, scale=2.0, offset=-1.0)
    gamma, beta = _params(6)
    fn = lambda x, g, b: jaxbn.group_norm(x, g, b, groups=3, layout=layout)
    testing.check_vjp(fn, lambda x, g, b: reference.group_norm(x, g, b, groups=3, layout=layout),
                      x, gamma, beta)


def test_group_norm_with_one_value_per_group_is_an_error():
    with pytest.raises(ValueError, match="at least 2 values per example.*Use fewer groups"):
        jaxbn.group_norm(jnp.ones((2, 4, 1, 1)), jnp.ones(4), jnp.zeros(4), groups=4)


@pytest.mark.slow
@pytest.mark.parametrize("padding", [np.nan, np.inf])
def test_layer_and_group_norm_masks_select(padding):
    x = rand(0, (3, 6), scale=2.0, offset=1.0)
    mask = jnp.asarray([[1, 1, 0, 1, 1, 1], [1, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 0]], bool)
    gamma, beta = _params(6)

    valid = [np.flatnonzero(np.asarray(row)) for row in mask]  # outside: traceable, jitted

    def valid_only(x, g, b):  # each row normalized over its valid entries, zeros elsewhere
        rows = []
        for i in range(3):
            cols = valid[i]
            yi = reference.normalize(x[i, cols][None], g[cols][None], b[cols][None], (1,),
                                     1e-5)[0][0]
            rows.append(jnp.zeros(6).at[cols].set(yi))
        return jnp.stack(rows)

    padded = jnp.where(mask, x, padding)
    testing.check_vjp(lambda x, g, b: jaxbn.layer_norm(x, g, b, mask=mask), valid_only,
                      padded, gamma, beta, argnums=(1, 2))
    testing.check_vjp(lambda x, g, b: jaxbn.layer_norm(x, g, b, mask=mask), valid_only,
                      x, gamma, beta)
    xg = rand(1, (2, 4, 3, 3), offset=2.0)
    mask_g = rand(2, (2, 1, 3, 3)) > 0  # padding pixels, the same for every channel
    y = jaxbn.group_norm(jnp.where(mask_g, xg, padding), jnp.ones(4), jnp.zeros(4), groups=2,
                         mask=mask_g)
    for n in range(2):
        for g in range(2):
            block = np.asarray(xg[n, 2 * g:2 * g + 2])[:, np.asarray(mask_g[n, 0])]
            out = np.asarray(y[n, 2 * g:2 * g + 2])[:, np.asarray(mask_g[n, 0])]
            np.testing.assert_allclose(out, (block - block.mean()) / np.sqrt(block.var() + 1e-5),
                                       rtol=1e-10, atol=1e-10)
    assert np.all(np.isfinite(y))


def test_dropout_rate_may_be_traced_and_rate_1_has_no_nan_gradient():
    x = rand(0, (50, 40), jnp.float32)
    key = jax.random.key(3)
    fn = jax.jit(lambda x, rate: jaxbn.dropout(key, x, rate=rate, train=True))
    for rate in (0.0, 0.3, 0.75):
        y = fn(x, jnp.float32(rate))
        assert abs(float(jnp.mean(y == 0)) - rate) < 0.03
        kept = np.asarray(y) != 0
        # A traced rate is realized in steps of 2^-16; the scale is 1 / the realized keep.
        keep = round((1 - float(np.float32(rate))) * 65536) / 65536
        np.testing.assert_allclose(np.asarray(y)[kept], np.asarray(x)[kept] / keep, rtol=1e-6)
    # The same mask as the concrete rate would draw with 16 bits: the oracle's, for a rate that
    # is not a multiple of 1/256 (there a concrete rate also takes 16 bits).
    np.testing.assert_array_equal(fn(x, jnp.float32(0.3)), reference.dropout(key, x, rate=0.3))
    y, pullback = jax.vjp(lambda x: fn(x, jnp.float32(1.0)), x)
    assert np.all(y == 0) and np.all(pullback(jnp.ones_like(y))[0] == 0)


# --- validation -------------------------------------------------------------------------------

BAD = [
    ("vbs-not-dividing", dict(virtual_batch_size=5), ValueError, "must divide the batch of 8"),
    ("vbs-zero", dict(virtual_batch_size=0), ValueError, "virtual_batch_size must be a positive"),
    ("r_max-below-1", dict(renorm=dict(r_max=0.5, d_max=1.0)), ValueError, "r_max must be >= 1"),
    ("d_max-negative", dict(renorm=dict(r_max=2.0, d_max=-1.0)), ValueError, "d_max must be >= 0"),
    ("renorm-keys", dict(renorm=dict(rmax=2.0)), TypeError, "renorm must be a dict with keys"),
    ("renorm-and-mask", dict(renorm=dict(r_max=2.0, d_max=1.0), mask=jnp.ones(8, bool)),
     ValueError, "cannot be combined with mask="),
    ("running_var", dict(running_var="sample"), ValueError, "running_var must be one of"),
    ("momentum-none-no-count", dict(momentum=None, state=jaxbn.BatchNormState(
        jnp.zeros(D), jnp.ones(D))), ValueError, "momentum=None .* needs a batch counter"),
    ("count-not-int", dict(state=jaxbn.BatchNormState(jnp.zeros(D), jnp.ones(D), jnp.ones(()))),
     ValueError, "state.count must be an integer scalar"),
    ("groups-without-axis-name", dict(axis_index_groups=[[0], [1]]), ValueError,
     "axis_index_groups needs axis_name"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("options,error,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_options(options, error, match, jit):
    options = dict(options)
    state = options.pop("state", jaxbn.init_batch_norm_state(D))
    call = lambda x: jaxbn.batch_norm(x, jnp.ones(D), jnp.zeros(D), state, train=True,
                                      **options)[0]
    with pytest.raises(error, match=match):
        (jax.jit(call) if jit else call)(jnp.ones((8, D)))


def test_fold_validates_its_arguments():
    state = jaxbn.init_batch_norm_state(3)
    with pytest.raises(ValueError, match="kernel_layout must be one of"):
        jaxbn.fold_batch_norm(jnp.ones((2, 3)), None, None, None, state, kernel_layout="IO")
    with pytest.raises(ValueError, match=r"gamma must have shape \(3,\)"):
        jaxbn.fold_batch_norm(jnp.ones((2, 3)), None, jnp.ones(2), None, state)
    with pytest.raises(ValueError, match="4-D OIHW kernel"):
        jaxbn.fold_batch_norm(jnp.ones((2, 3)), None, None, None, state, kernel_layout="OIHW")


def test_renorm_with_autodiff_is_the_naive_forward_and_supports_jvp():
    x, gamma, beta, state = _renorm_args()
    renorm = dict(r_max=1.5, d_max=0.5)
    fn = lambda x: jaxbn.batch_norm(x, gamma, beta, state, train=True, renorm=renorm,
                                    backward="autodiff")[0]
    ref = lambda x: reference.batch_renorm_train(x, gamma, beta, state.mean, state.var,
                                                 r_max=1.5, d_max=0.5)
    t = rand(9, x.shape)
    np.testing.assert_allclose(jax.jvp(fn, (x,), (t,))[1], jax.jvp(ref, (x,), (t,))[1],
                               rtol=1e-12, atol=1e-12)
