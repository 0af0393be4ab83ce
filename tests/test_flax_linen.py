"""jaxbn.flax.linen against flax.linen's own layers: same inputs, same variables, same numbers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import jaxbn.flax.linen as jlinen
from jaxbn import testing
from tests.helpers import rand

F32 = jnp.float32


def _randomized(variables, seed):
    """Non-trivial scale and bias (the same for both layers)."""
    params = dict(variables["params"])
    for i, name in enumerate(("scale", "bias")):
        if name in params:
            params[name] = rand(seed + i, params[name].shape, F32, 0.5, 1.0 - i)
    return {**variables, "params": params}


def _apply(layer, variables, **call):
    """``f(params, x) -> y`` with the other collections fixed (their updates dropped)."""
    rest = {k: v for k, v in variables.items() if k != "params"}

    def f(params, x):
        out = layer.apply({**rest, "params": params}, x, mutable=list(rest), **call)
        return out[0] if rest else out
    return jax.jit(f)  # jitted: eager op-by-op dispatch made these tests slow


@pytest.mark.parametrize("shape, axis", [((64, 12), -1), ((8, 5, 5, 6), -1), ((8, 6, 5, 5), 1)],
                         ids=["dense", "nhwc", "nchw"])
def test_batch_norm_matches_linen_over_steps_train_and_eval(shape, axis):
    flax_bn, ours = nn.BatchNorm(axis=axis), jlinen.BatchNorm(axis=axis)
    x0 = rand(0, shape, F32, 2.0, 5.0)
    variables = _randomized(flax_bn.init(jax.random.key(0), x0, use_running_average=False), 3)
    assert jax.tree.structure(variables) == jax.tree.structure(
        ours.init(jax.random.key(0), x0, use_running_average=False))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)  # init updates nothing
    v_flax = v_ours = variables
    train = lambda layer: jax.jit(lambda v, x: layer.apply(v, x, use_running_average=False,
                                                          mutable=["batch_stats"]))
    train_ours, train_flax = train(ours), train(flax_bn)  # compiled once for the three steps
    for step in range(3):
        x = rand(step, shape, F32, 2.0, 5.0)
        testing.check_vjp(_apply(ours, v_ours, use_running_average=False),
                          _apply(flax_bn, v_flax, use_running_average=False),
                          v_ours["params"], x, key=jax.random.key(step), rtol=2e-4, atol=2e-5)
        y_ours, upd_ours = train_ours(v_ours, x)
        y_flax, upd_flax = train_flax(v_flax, x)
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
        v_ours, v_flax = {**v_ours, **upd_ours}, {**v_flax, **upd_flax}
        for stat in ("mean", "var"):
            np.testing.assert_allclose(v_ours["batch_stats"][stat], v_flax["batch_stats"][stat],
                                       rtol=1e-6, atol=1e-6)
    assert not np.allclose(v_ours["batch_stats"]["var"], 1.0)
    x = rand(9, shape, F32, 2.0, 5.0)
    testing.check_vjp(_apply(ours, v_ours, use_running_average=True),
                      _apply(flax_bn, v_ours, use_running_average=True), v_ours["params"], x,
                      rtol=1e-5, atol=1e-6)


def test_layer_and_group_norm_match_linen():
    x = rand(4, (4, 6, 6, 16), F32, 2.0, 3.0)
    for flax_layer, ours in [(nn.LayerNorm(), jlinen.LayerNorm()),
                             (nn.GroupNorm(num_groups=4), jlinen.GroupNorm(num_groups=4)),
                             (nn.GroupNorm(num_groups=None, group_size=8),
                              jlinen.GroupNorm(num_groups=None, group_size=8))]:
        variables = _randomized(flax_layer.init(jax.random.key(0), x), 5)
        testing.check_vjp(_apply(ours, variables), _apply(flax_layer, variables),
                          variables["params"], x, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="group_size must divide"):
        jlinen.GroupNorm(num_groups=None, group_size=5).init(jax.random.key(0), x)


def test_dropout_uses_the_same_rng_stream_and_mask_as_linen():
    x = rand(0, (40, 30), F32)
    rngs = {"dropout": jax.random.key(5)}
    for flax_do, ours in [(nn.Dropout(0.3), jlinen.Dropout(0.3)),
                          (nn.Dropout(0.5, broadcast_dims=(0,)),
                           jlinen.Dropout(0.5, broadcast_dims=(0,)))]:
        y_flax = flax_do.apply({}, x, deterministic=False, rngs=rngs)
        y_ours = ours.apply({}, x, deterministic=False, rngs=rngs)
        np.testing.assert_allclose(y_ours, y_flax, rtol=1e-6)
        assert 0 < float(jnp.mean(y_ours == 0)) < 1
    np.testing.assert_array_equal(jlinen.Dropout(0.3).apply({}, x, deterministic=True), x)


class ConvNet(nn.Module):
    """``layers`` provides BatchNorm and Dropout: the one line a user changes."""

    layers: object

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)  # no bias before batch norm (see test_flax_nnx)
        x = self.layers.BatchNorm(use_running_average=not train)(x)
        x = self.layers.Dropout(0.25, deterministic=not train)(nn.relu(x))
        return nn.Dense(4)(x.mean(axis=(1, 2)))


def _train(layers, steps=20):
    model = ConvNet(layers)
    xs = rand(1, (steps, 16, 8, 8, 3), F32, 1.0, 0.5)
    ys = 2 * (xs[..., 0].mean((2, 3)) > xs[..., 1].mean((2, 3))) + (xs[..., 2].mean((2, 3)) > 0.5)
    variables = model.init(jax.random.key(0), xs[0], train=False)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(variables["params"])

    @jax.jit
    def step(variables, opt_state, x, y, key):
        def loss_fn(params):
            scores, updates = model.apply({**variables, "params": params}, x, train=True,
                                          mutable=["batch_stats"], rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(scores, y).mean(), updates
        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        changes, opt_state = optimizer.update(grads, opt_state)
        params = optax.apply_updates(variables["params"], changes)
        return {**variables, **updates, "params": params}, opt_state, loss

    losses = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        variables, opt_state, loss = step(variables, opt_state, x, y, jax.random.key(100 + i))
        losses.append(float(loss))
    return np.array(losses), model.apply(variables, xs[0], train=False)


@pytest.mark.slow
def test_swapping_the_import_trains_a_conv_net_to_the_same_losses():
    losses_flax, eval_flax = _train(nn)
    losses_ours, eval_ours = _train(jlinen)
    np.testing.assert_allclose(losses_ours, losses_flax, rtol=2e-4, atol=2e-5)
    assert losses_ours[-5:].mean() < 0.95 * losses_ours[:5].mean()
    np.testing.assert_allclose(eval_ours, eval_flax, rtol=1e-3, atol=1e-4)


def test_axis_name_under_vmap_matches_linen():
    x = rand(0, (4, 8, 6), F32, 2.0, 1.0)
    outs = []
    for layer in (nn.BatchNorm(axis_name="devices"), jlinen.BatchNorm(axis_name="devices")):
        variables = layer.init(jax.random.key(0), x[0], use_running_average=False)
        run = jax.vmap(lambda x: layer.apply(variables, x, use_running_average=False,
                                             mutable=["batch_stats"]),
                       axis_name="devices", out_axes=(0, None))
        outs.append(run(x))
    (y_flax, s_flax), (y_ours, s_ours) = outs
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_ours["batch_stats"]["var"], s_flax["batch_stats"]["var"],
                               rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Linen's own contracts, case by case against nn's layer on the same inputs and variables.


def _against_linen(flax_layer, ours, x, *, rtol, atol, mutable=("batch_stats",), seed=5,
                   grads=True, **call):
    """Outputs, their dtype, the updated collections and the VJPs (random cotangents, w.r.t. the
    parameters and x) of ``ours`` against ``flax_layer``, from the same variables."""
    # Jitted: eager op-by-op dispatch made these tests slow.
    init = lambda layer: jax.jit(lambda key, x: layer.init(key, x, **call))(jax.random.key(0), x)
    variables = init(flax_layer)
    assert jax.tree.structure(variables) == jax.tree.structure(init(ours))
    variables = _randomized(variables, seed)
    mutable = [m for m in mutable if m in variables]
    (y_ours, upd_ours), (y_flax, upd_flax) = (
        jax.jit(lambda v, x: layer.apply(v, x, mutable=mutable, **call))(variables, x)
        for layer in (ours, flax_layer))
    assert y_ours.dtype == y_flax.dtype
    np.testing.assert_allclose(np.asarray(y_ours, np.complex128), np.asarray(y_flax, np.complex128),
                               rtol=rtol, atol=atol)
    for a, b in zip(jax.tree.leaves(upd_ours), jax.tree.leaves(upd_flax)):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    if grads:
        testing.check_vjp(_apply(ours, variables, **call), _apply(flax_layer, variables, **call),
                          variables["params"], x, rtol=rtol, atol=atol)
    return upd_ours


@pytest.mark.parametrize("layer,x_dtype,dtype", [
    ("BatchNorm", F32, jnp.bfloat16), ("BatchNorm", jnp.bfloat16, None),
    ("LayerNorm", F32, jnp.bfloat16), ("GroupNorm", jnp.float16, jnp.bfloat16)],
    ids=["bn-f32-to-bf16", "bn-bf16-to-f32", "ln-f32-to-bf16", "gn-f16-to-bf16"])
def test_dtype_is_the_output_s_the_statistics_come_from_x_as_given(layer, x_dtype, dtype):
    """Linen computes the statistics from x as given (at least float32) and applies ``dtype``
    to the output only; without a dtype the output takes x's and the parameters' common dtype."""
    options = dict(use_running_average=False) if layer == "BatchNorm" else (
        dict(num_groups=4) if layer == "GroupNorm" else {})
    x = rand(1, (16, 8), F32, 2.0, 3.0).astype(x_dtype)
    _against_linen(getattr(nn, layer)(dtype=dtype, **options),
                   getattr(jlinen, layer)(dtype=dtype, **options), x, rtol=2e-2, atol=2e-2)


def test_one_value_per_feature_and_rank_one_inputs_normalize_to_the_bias():
    """A batch of one (and an x of rank 1, one example) in train mode: variance 0, output the
    bias, as Linen; jaxbn's core refuses it by default, the adapter follows Linen."""
    for x in (rand(2, (1, 4), F32, 1.0, 2.0), rand(3, (4,), F32)):
        # dx is 0: Linen's exactly, jaxbn's rules up to rounding of terms of size
        # 1 / sqrt(eps) = 316 (atol).
        upd = _against_linen(nn.BatchNorm(use_running_average=False),
                             jlinen.BatchNorm(use_running_average=False), x, rtol=1e-6,
                             atol=1e-4)
        np.testing.assert_allclose(upd["batch_stats"]["var"], 0.99, rtol=1e-6)


@pytest.mark.slow
def test_complex_batch_norm_matches_linen_mean_complex_variance_real():
    """Flax's complex batch norm (its own test's shapes): a complex running mean, a real running
    variance, complex output; with a mask, NaN in the masked-out entries reaches nothing."""
    x = jax.lax.complex(rand(4, (4, 3, 2), F32), rand(5, (4, 3, 2), F32, 1.0, 1.0))
    mask = jax.random.bernoulli(jax.random.key(6), 0.6, (4, 3, 1)).at[0].set(True)
    flax_bn = nn.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    ours = jlinen.BatchNorm(momentum=0.9, use_running_average=False, dtype=jnp.complex64)
    upd = _against_linen(flax_bn, ours, x, rtol=1e-5, atol=1e-5, grads=False)
    assert upd["batch_stats"]["mean"].dtype == jnp.complex64
    assert upd["batch_stats"]["var"].dtype == jnp.float32
    padded = jnp.where(mask, x, jnp.nan)
    variables = flax_bn.init(jax.random.key(0), padded, mask=mask)
    (y_o, u_o), (y_f, u_f) = (layer.apply(variables, padded, mask=mask, mutable=["batch_stats"])
                              for layer in (ours, flax_bn))
    valid = np.broadcast_to(np.asarray(mask), x.shape)
    np.testing.assert_allclose(np.asarray(y_o)[valid], np.asarray(y_f)[valid], rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(y_o)[~valid] == 0)  # by design: masked-out outputs are 0
    for a, b in zip(jax.tree.leaves(u_o), jax.tree.leaves(u_f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # Eval mode reads the complex running mean; gradients as Linen's (real and imaginary parts).
    variables = {**variables, **u_o}
    split = lambda layer, frozen: jax.jit(lambda p, xr, xi: (lambda y: jnp.stack(
        [jnp.real(y), jnp.imag(y)]))(layer(momentum=0.9, dtype=jnp.complex64).apply(
            {**variables, "params": p}, jax.lax.complex(xr, xi), frozen,
            mutable=["batch_stats"])[0]))
    for frozen in (False, True):
        testing.check_vjp(split(jlinen.BatchNorm, frozen), split(nn.BatchNorm, frozen),
                          variables["params"], jnp.real(x), jnp.imag(x), rtol=1e-4, atol=1e-5)


def test_a_mask_varying_along_the_features_matches_linen_on_the_valid_entries():
    x = rand(7, (12, 5), F32, 2.0, 1.0)
    mask = jax.random.bernoulli(jax.random.key(8), 0.7, (12, 5)).at[:2].set(True)
    flax_bn, ours = (m.BatchNorm(use_running_average=False) for m in (nn, jlinen))
    variables = _randomized(flax_bn.init(jax.random.key(0), x, mask=mask), 3)
    (y_o, u_o), (y_f, u_f) = (layer.apply(variables, x, mask=mask, mutable=["batch_stats"])
                              for layer in (ours, flax_bn))
    for a, b in zip(jax.tree.leaves(u_o), jax.tree.leaves(u_f)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # per feature, its valid entries
    np.testing.assert_allclose(jnp.where(mask, y_o, 0), jnp.where(mask, y_f, 0), rtol=1e-5,
                               atol=1e-5)
    assert np.all(np.asarray(y_o)[~np.asarray(mask)] == 0)  # by design
    # Gradients agree under cotangents on the valid entries (Flax's masked-out outputs depend on
    # their own x, jaxbn's do not).
    valid_only = lambda layer: jax.jit(lambda p, x: jnp.where(mask, layer.apply(
        {**variables, "params": p}, x, mask=mask, mutable=["batch_stats"])[0], 0))
    testing.check_vjp(valid_only(ours), valid_only(flax_bn), variables["params"], x, rtol=1e-4,
                      atol=1e-5)


@pytest.mark.slow
def test_the_axes_flax_accepts_for_layer_and_group_norm():
    """Group norm over reduction_axes that include the batch axis or skip one; layer norm over a
    middle axis, and with its parameters along an axis it does not reduce (instance norm)."""
    cases = [(nn.GroupNorm(num_groups=4, reduction_axes=(-3, -2, -1)), (3, 4, 32)),
             (nn.GroupNorm(num_groups=2, reduction_axes=(0, 1, 3, 4)), (2, 3, 2, 2, 8)),
             (nn.LayerNorm(reduction_axes=1, feature_axes=1), (2, 3, 4)),
             (nn.LayerNorm(reduction_axes=(1, 2), feature_axes=-1), (2, 3, 4, 5))]
    for flax_layer, shape in cases:
        fields = {f: getattr(flax_layer, f) for f in ("num_groups", "reduction_axes",
                                                      "feature_axes") if hasattr(flax_layer, f)}
        ours = type(flax_layer).__name__
        _against_linen(flax_layer, getattr(jlinen, ours)(**fields), rand(8, shape, F32, 2.0, 1.0),
                       rtol=1e-4, atol=1e-5)
    for layer in (nn.GroupNorm(num_groups=2, reduction_axes=(1,)),
                  jlinen.GroupNorm(num_groups=2, reduction_axes=(1,))):
        with pytest.raises(ValueError, match="must include the final dimension"):
            layer.init(jax.random.key(0), jnp.ones((2, 4, 8)))


def test_unbound_axis_name_raises_what_linen_raises_and_eval_needs_none():
    x = rand(9, (8, 3), F32)
    raised = []
    for layer in (nn.BatchNorm(axis_name="batch"), jlinen.BatchNorm(axis_name="batch")):
        variables = layer.init(jax.random.key(0), x, use_running_average=False)  # init: unbound
        with pytest.raises(NameError) as error:
            layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
        raised.append(error.value)
        np.testing.assert_allclose(layer.apply(variables, x, use_running_average=True),
                                   x / np.sqrt(1 + 1e-5), rtol=1e-6)  # eval: no axis needed
    assert isinstance(raised[1], type(raised[0]))
    # Layer norm across a mapped axis (x split along its normalized axis), as Linen.
    xs = rand(10, (2, 4, 6), F32, 2.0, 1.0)
    outs = []
    for layer in (nn.LayerNorm(axis_name="d"), jlinen.LayerNorm(axis_name="d")):
        variables = _randomized(jax.vmap(lambda x: layer.init(jax.random.key(0), x),
                                         axis_name="d", out_axes=None)(xs), 1)
        outs.append(jax.vmap(lambda x: layer.apply(variables, x), axis_name="d")(xs))
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5)


def test_under_nn_scan_nn_remat_and_nn_vmap_as_linen():
    x = rand(11, (6, 4), F32, 2.0, 1.0)

    def scanned(layers):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, h, _):
                return nn.Dense(4)(layers.BatchNorm(use_running_average=False)(h)), None
        return nn.scan(Block, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, length=3)()

    def remat(layers):
        return nn.remat(layers.BatchNorm)(use_running_average=False)

    def vmapped(layers):  # per-example calls, the batch the mapped axis
        return nn.vmap(layers.BatchNorm, variable_axes={"params": None, "batch_stats": None},
                       split_rngs={"params": False}, axis_name="b")(
            use_running_average=False, axis_name="b")

    for build, args in [(scanned, (x, None)), (remat, (x,)), (vmapped, (x[:, None],))]:
        results = []
        for layers in (nn, jlinen):
            model = build(layers)
            # Jitted: eager op-by-op dispatch made this test slow.
            variables = _randomized(jax.jit(lambda k: model.init(k, *args))(jax.random.key(0)), 2)
            out, updates = jax.jit(lambda v: model.apply(v, *args, mutable=["batch_stats"]))(
                variables)
            ct = rand(12, x.shape, F32).reshape(jax.tree.leaves(out)[0].shape)
            grads = jax.jit(jax.grad(lambda p: jnp.sum(jax.tree.leaves(model.apply(
                {**variables, "params": p}, *args, mutable=["batch_stats"])[0])[0] * ct)))(
                variables["params"])
            results.append((out, updates, grads))
        for a, b in zip(jax.tree.leaves(results[1]), jax.tree.leaves(results[0])):
            np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_the_documented_differences_from_flax_hold():
    """The list in jaxbn.flax.nnx's docstring: a feature without a valid entry keeps its running
    statistics (Flax's become NaN); with mask and axis_name the statistics are the global
    batch's (Flax averages the devices' means); force_float32_reductions=False keeps Linen's
    variable dtypes."""
    x = rand(13, (8, 3), F32, 1.0, 2.0)
    mask = jnp.ones((8, 3), bool).at[:, 0].set(False)
    stats = [jax.jit(lambda x, m: layer.apply(layer.init(jax.random.key(0), x), x, mask=m,
                                              mutable=["batch_stats"])[1]["batch_stats"])(x, mask)
             for layer in (nn.BatchNorm(use_running_average=False),
                           jlinen.BatchNorm(use_running_average=False))]
    assert np.isnan(stats[0]["mean"][0]) and stats[1]["mean"][0] == 0.0
    np.testing.assert_allclose(stats[1]["mean"][1:], stats[0]["mean"][1:], rtol=1e-6)
    xs = rand(14, (2, 4, 3), F32) + jnp.array([0.0, 5.0])[:, None, None]  # two "devices"
    rows = jnp.array([[1, 1, 1, 1], [1, 0, 0, 0]], bool)[:, :, None]  # 4 and 1 valid rows
    means = []
    for layer in (nn.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0),
                  jlinen.BatchNorm(use_running_average=False, axis_name="d", momentum=0.0)):
        variables = layer.init(jax.random.key(0), xs[0])
        means.append(jax.jit(jax.vmap(lambda x, m: layer.apply(variables, x, mask=m,
                                                               mutable=["batch_stats"])[1],
                                      axis_name="d", out_axes=None))(xs, rows)
                     ["batch_stats"]["mean"])
    valid = np.concatenate([np.asarray(xs[0]), np.asarray(xs[1, :1])])
    np.testing.assert_allclose(means[1], valid.mean(0), rtol=1e-5)  # the 5 valid rows'
    np.testing.assert_allclose(means[0], (xs[0].mean(0) + xs[1, 0]) / 2, rtol=1e-5)
    xb = x.astype(jnp.bfloat16)
    dtypes = [jax.tree.map(lambda a: a.dtype, layer.apply(layer.init(jax.random.key(0), xb), xb,
                                                          mutable=["batch_stats"])[1])
              for layer in (nn.BatchNorm(False, force_float32_reductions=False,
                                         param_dtype=jnp.bfloat16),
                            jlinen.BatchNorm(False, force_float32_reductions=False,
                                             param_dtype=jnp.bfloat16))]
    assert dtypes[0] == dtypes[1] == {"batch_stats": {"mean": jnp.bfloat16, "var": jnp.bfloat16}}
