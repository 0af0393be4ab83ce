"""Batch norm and spatial batch norm: gradients, invariants, numerics and bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference, testing

from helpers import rand

RULES = ["alt", "graph"]

# (shape, feature axis): rank 2..4, the feature axis first, middle and last.
CASES = [((8, 5), -1), ((16, 3), 1), ((6, 4, 3), 1), ((5, 2, 3, 4), 0), ((4, 3, 5, 2), 1),
         ((3, 4, 2, 6), -1)]
CASE_IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]


def _params(num_features, dtype, seed=1):
    gamma = rand(seed, (num_features,), dtype, scale=0.5, offset=1.0)
    beta = rand(seed + 1, (num_features,), dtype)
    return gamma, beta


def _state(num_features, seed=3):
    return jaxbn.BatchNormState(rand(seed, (num_features,), jnp.float32),
                                jnp.abs(rand(seed + 1, (num_features,), jnp.float32)) + 0.5)


def _bn_fn(state, backward, axis):
    return lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, axis=axis,
                                            backward=backward)[0]


def _ref_fn(axis):
    return lambda x, g, b: reference.batch_norm_train(x, g, b, axis=axis)[0]


# ---------------------------------------------------------------------------------------------
# Gradient equivalence under random cotangents (never grad(sum(y)): it is identically zero).


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("shape,axis", CASES, ids=CASE_IDS)
def test_vjp_matches_autodiff_float64(backward, shape, axis):
    x = rand(0, shape, jnp.float64, scale=2.0, offset=0.5)
    state = jaxbn.init_batch_norm_state(shape[axis], jnp.float64)
    testing.check_vjp(_bn_fn(state, backward, axis), _ref_fn(axis), x,
                      *_params(shape[axis], jnp.float64))


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("shape,axis", CASES + [((256, 7), 1)], ids=CASE_IDS + ["256x7-axis1"])
def test_vjp_matches_autodiff_float32(backward, shape, axis):
    """float32 against the float64 ground truth, tolerance scaled with the reduction size."""
    x = rand(0, shape, jnp.float32, scale=2.0, offset=0.5)
    state = jaxbn.init_batch_norm_state(shape[axis])
    testing.check_vjp(_bn_fn(state, backward, axis), _ref_fn(axis), x,
                      *_params(shape[axis], jnp.float32), reference_dtype=jnp.float64,
                      reduction_size=x.size // shape[axis])


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_spatial_vjp_matches_autodiff(backward, layout, dtype):
    shape = (4, 3, 5, 6) if layout == "NCHW" else (4, 5, 6, 3)
    axis = 1 if layout == "NCHW" else 3
    x = rand(0, shape, dtype, scale=2.0, offset=-1.0)
    state = jaxbn.init_batch_norm_state(3, dtype)
    fn = lambda x, g, b: jaxbn.spatial_batch_norm(x, g, b, state, train=True, layout=layout,
                                                  backward=backward)[0]
    testing.check_vjp(fn, _ref_fn(axis), x, *_params(3, dtype), reference_dtype=jnp.float64,
                      reduction_size=120)


def test_rules_are_not_trivially_equal_to_a_wrong_gradient():
    """Sanity of the comparison itself: a backward that ignores the statistics is caught."""
    gamma, beta = _params(5, jnp.float64)
    sg = jax.lax.stop_gradient
    wrong = lambda x, g, b: (x - sg(x.mean(0))) / sg(jnp.sqrt(x.var(0) + 1e-5)) * g + b
    with pytest.raises(AssertionError, match="w.r.t. input 0 differs"):
        testing.check_vjp(wrong, _ref_fn(-1), rand(0, (8, 5)), gamma, beta)


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("spatial", [False, True], ids=["flat", "spatial"])
def test_finite_differences_float64_first_and_second_order(backward, spatial):
    if spatial:
        x = rand(0, (2, 3, 2, 3), scale=2.0, offset=3.0)
        state = jaxbn.init_batch_norm_state(3, jnp.float64)
        fn = lambda x, g, b: jaxbn.spatial_batch_norm(x, g, b, state, train=True,
                                                      backward=backward)[0]
    else:
        x = rand(0, (5, 4), scale=2.0, offset=3.0)
        state = jaxbn.init_batch_norm_state(4, jnp.float64)
        fn = _bn_fn(state, backward, -1)
    args = (x, *_params(x.shape[1], jnp.float64))
    fn = jax.jit(fn)  # one compilation instead of op-by-op dispatch of the eager derivatives
    testing.check_finite_differences(fn, *args, tol=1e-8)
    testing.check_finite_differences(fn, *args, order=2)


@pytest.mark.parametrize("backward", RULES)
def test_hessian_matches_autodiff(backward):
    x = rand(0, (5, 3))
    gamma, beta = _params(3, jnp.float64)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    weights = jnp.arange(15.0).reshape(5, 3)
    loss = lambda fn: (lambda x: jnp.sum(jnp.sin(fn(x, gamma, beta)) * weights))
    testing.check_vjp(jax.grad(loss(_bn_fn(state, backward, -1))), jax.grad(loss(_ref_fn(-1))),
                      x, rtol=1e-10)


def test_autodiff_backward_supports_jvp():
    x = rand(0, (6, 3))
    gamma, beta = _params(3, jnp.float64)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    fn = lambda x: jaxbn.batch_norm(x, gamma, beta, state, train=True, backward="autodiff")[0]
    t = rand(1, x.shape)
    _, tangent = jax.jvp(fn, (x,), (t,))
    _, tangent_ref = jax.jvp(lambda x: reference.batch_norm_train(x, gamma, beta)[0], (x,), (t,))
    np.testing.assert_allclose(tangent, tangent_ref, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Invariants.


@pytest.mark.parametrize("backward", ["alt", "graph", "autodiff"])
def test_train_mode_output_mean_is_beta_and_std_is_gamma(backward):
    x = rand(0, (200, 4), jnp.float32, scale=3.0, offset=-2.0)
    gamma = jnp.array([1.0, 2.0, 0.5, 3.0], jnp.float32)
    beta = jnp.array([0.0, -1.0, 4.0, 0.25], jnp.float32)
    y, _ = jaxbn.batch_norm(x, gamma, beta, jaxbn.init_batch_norm_state(4), train=True,
                            backward=backward)
    np.testing.assert_allclose(y.mean(0), beta, atol=1e-5)
    np.testing.assert_allclose(y.std(0), gamma, rtol=1e-4)


@pytest.mark.parametrize("momentum", [0.0, 0.3, 0.9, 1.0])
def test_running_statistics_formula(momentum):
    x = rand(0, (10, 3), jnp.float64, scale=2.0, offset=1.0)
    state = _state(3)
    state = jaxbn.BatchNormState(state.mean.astype(jnp.float64), state.var.astype(jnp.float64))
    gamma, beta = _params(3, jnp.float64)
    _, new = jaxbn.batch_norm(x, gamma, beta, state, train=True, momentum=momentum)
    xn = np.asarray(x)
    np.testing.assert_allclose(new.mean, momentum * np.asarray(state.mean)
                               + (1 - momentum) * xn.mean(0), rtol=1e-13)
    # The biased variance (ddof=0), as the paper and cs231n use.
    np.testing.assert_allclose(new.var, momentum * np.asarray(state.var)
                               + (1 - momentum) * xn.var(0), rtol=1e-13)


def test_spatial_running_statistics_are_per_channel():
    x = rand(0, (4, 3, 5, 2), jnp.float64, offset=2.0)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    _, new = jaxbn.spatial_batch_norm(x, jnp.ones(3), jnp.zeros(3), state, train=True,
                                      momentum=0.5)
    xn = np.asarray(x)
    np.testing.assert_allclose(new.mean, 0.5 * xn.mean((0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(new.var, 0.5 + 0.5 * xn.var((0, 2, 3)), rtol=1e-13)


@pytest.mark.parametrize("layout", ["flat", "NCHW", "NHWC"])
def test_test_mode_uses_running_statistics_and_keeps_state(layout):
    shape = {"flat": (7, 3), "NCHW": (2, 3, 4, 4), "NHWC": (2, 4, 4, 3)}[layout]
    x = rand(0, shape, jnp.float32, scale=2.0)
    gamma, beta = _params(3, jnp.float32)
    state = _state(3)
    if layout == "flat":
        y, new = jaxbn.batch_norm(x, gamma, beta, state, train=False)
        bshape = (1, 3)
    else:
        y, new = jaxbn.spatial_batch_norm(x, gamma, beta, state, train=False, layout=layout)
        bshape = (1, 3, 1, 1) if layout == "NCHW" else (1, 1, 1, 3)
    r = lambda a: np.asarray(a, np.float64).reshape(bshape)
    # sqrt(var + eps), not var + eps (a bug of one of the write-ups).
    expected = (np.asarray(x, np.float64) - r(state.mean)) / np.sqrt(r(state.var) + 1e-5) \
        * r(gamma) + r(beta)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(new, state))


@pytest.mark.parametrize("train", [True, False])
def test_no_gradient_through_state(train):
    x = rand(0, (6, 3))
    gamma, beta = _params(3, jnp.float64)

    def loss(state):
        y, new = jaxbn.batch_norm(x, gamma, beta, state, train=train)
        w = jnp.arange(18.0).reshape(6, 3)
        return jnp.sum(y * w) + jnp.sum(new.mean * 3.0) + jnp.sum(new.var * 5.0)

    grads = jax.grad(loss)(jaxbn.BatchNormState(rand(1, (3,)), jnp.ones(3) * 2.0))
    assert len(jax.tree.leaves(grads)) == 2
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))


@pytest.mark.slow
@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_jit_vmap_and_second_order_agree(backward, dtype):
    """Eager == jit, vmap over independent batches == a loop (statistics per batch, never pooled
    across the mapped axis), reverse-over-reverse eager == jit; each with its own running state."""
    x = rand(0, (9, 4), dtype, scale=2.0)
    gamma, beta = _params(4, dtype)

    def fn(x, gamma, beta, state):
        return jaxbn.batch_norm(x, gamma, beta, state, train=True, backward=backward)

    state = jaxbn.BatchNormState(rand(1, (4,), dtype),
                                 jnp.ones(4, dtype) + rand(2, (4,), dtype) ** 2)
    testing.check_transforms(fn, x, gamma, beta, state, argnums=(0, 1, 2), reduction_size=9)


def test_scan_over_steps_equals_python_loop():
    xs = rand(0, (5, 6, 3), jnp.float32, offset=2.0)
    gamma, beta = _params(3, jnp.float32)

    def step(state, x):
        y, state = jaxbn.batch_norm(x, gamma, beta, state, train=True, momentum=0.7)
        return state, y

    final, ys = jax.lax.scan(step, jaxbn.init_batch_norm_state(3), xs)
    state = jaxbn.init_batch_norm_state(3)
    for i in range(5):
        state, y = step(state, xs[i])
        np.testing.assert_allclose(ys[i], y, rtol=1e-6, atol=1e-6)
    for a, b in zip(final, state):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_grad_of_a_loss_through_jit_and_grad():
    """The user's composition: jax.jit(jax.grad(loss)) with the custom rule equals autodiff."""
    x = rand(0, (16, 5), jnp.float64)
    w = rand(1, (5, 5))
    target = rand(2, (16, 5))
    state = jaxbn.init_batch_norm_state(5, jnp.float64)

    def loss(params, backward):
        w, gamma, beta = params
        y, _ = jaxbn.batch_norm(x @ w, gamma, beta, state, train=True, backward=backward)
        return jnp.mean((jnp.tanh(y) - target) ** 2)

    params = (w, *_params(5, jnp.float64))
    testing.check_vjp(jax.jit(jax.grad(lambda p: loss(p, "alt"))),
                      jax.grad(lambda p: loss(p, "autodiff")), params, rtol=1e-10)


# ---------------------------------------------------------------------------------------------
# Numerics.


@pytest.mark.parametrize("backward", ["alt", "graph", "autodiff"])
@pytest.mark.parametrize("spatial", [False, True], ids=["flat", "spatial"])
def test_large_offset_float32_variance_is_accurate(backward, spatial):
    """|mean| >> std: E[x^2] - E[x]^2 would lose every digit here."""
    if spatial:
        x = rand(0, (16, 3, 8, 8), jnp.float32, offset=1e4)
        y, state = jaxbn.spatial_batch_norm(x, jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.float32),
                                            jaxbn.init_batch_norm_state(3), train=True,
                                            momentum=0.0, backward=backward)
        std = np.asarray(y, np.float64).std((0, 2, 3))
    else:
        x = rand(0, (4096, 3), jnp.float32, offset=1e4)
        y, state = jaxbn.batch_norm(x, jnp.ones(3, jnp.float32), jnp.zeros(3, jnp.float32),
                                    jaxbn.init_batch_norm_state(3), train=True, momentum=0.0,
                                    backward=backward)
        std = np.asarray(y, np.float64).std(0)
    assert np.all(np.abs(std - 1.0) <= 1e-3), std
    exact_var = np.asarray(x, np.float64).var((0, 2, 3) if spatial else 0)
    np.testing.assert_allclose(state.var, exact_var, rtol=1e-3)


@pytest.mark.parametrize("backward", RULES)
def test_large_offset_float32_gradient_is_accurate(backward):
    x = rand(0, (512, 3), jnp.float32, offset=1e4)
    gamma, beta = _params(3, jnp.float32)
    state = jaxbn.init_batch_norm_state(3)
    # The reference runs on the same float32 values, exactly, in float64.
    testing.check_vjp(_bn_fn(state, backward, -1), _ref_fn(-1), x, gamma, beta,
                      reference_dtype=jnp.float64, rtol=1e-3)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("backward", ["alt", "graph", "autodiff"])
def test_low_precision_inputs(dtype, backward):
    x32 = rand(0, (64, 4), jnp.float32, scale=2.0, offset=3.0)
    x = x32.astype(dtype)
    gamma, beta = _params(4, jnp.float32)
    state = jaxbn.init_batch_norm_state(4)
    fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, backward=backward)
    (y, new), pullback = jax.vjp(fn, x, gamma, beta)
    assert y.dtype == dtype
    assert new.mean.dtype == jnp.float32 and new.var.dtype == jnp.float32
    cot = rand(9, y.shape, dtype)
    dx, dgamma, dbeta = pullback((cot, jax.tree.map(jnp.zeros_like, new)))
    assert dx.dtype == dtype and dgamma.dtype == jnp.float32 and dbeta.dtype == jnp.float32
    # Against float64 math on the same (rounded) inputs: the errors of one rounding each way.
    testing.check_vjp(lambda x, g, b: fn(x, g, b)[0], _ref_fn(-1), x, gamma, beta,
                      reference_dtype=jnp.float64, reduction_size=64)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    np.testing.assert_allclose(new.mean, 0.1 * x64.mean(0), rtol=1e-5)


def test_float64_end_to_end():
    x = rand(0, (8, 3))
    gamma, beta = _params(3, jnp.float64)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    (y, new), pullback = jax.vjp(lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True),
                                 x, gamma, beta)
    grads = pullback((y, jax.tree.map(jnp.zeros_like, new)))
    assert y.dtype == jnp.float64 and new.mean.dtype == jnp.float64
    assert all(g.dtype == jnp.float64 for g in grads)


def test_residuals_are_one_input_sized_array():
    """The VJP keeps x (in its own dtype) and per-feature vectors, never a float32 x_hat."""
    for dtype in (jnp.float32, jnp.bfloat16):
        x = rand(0, (64, 16), dtype)
        gamma, beta = _params(16, jnp.float32)
        state = jaxbn.init_batch_norm_state(16)
        _, pullback = jax.vjp(_bn_fn(state, "alt", -1), x, gamma, beta)
        leaves = [leaf for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes")]
        big = [leaf for leaf in leaves if leaf.size > 16]
        assert len(big) == 1 and big[0].dtype == dtype and big[0].shape == x.shape
        assert sum(leaf.nbytes for leaf in leaves) <= 1.05 * x.nbytes + 16 * 4 * 4


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, eagerly and under the user's jit.

D = 4
GOOD = dict(x=np.ones((3, D), np.float32), gamma=np.ones(D, np.float32),
            beta=np.zeros(D, np.float32))

BAD = [
    ("gamma-1xD", dict(gamma=np.ones((1, D), np.float32)), {}, ValueError, "gamma"),
    ("beta-short", dict(beta=np.zeros(D - 1, np.float32)), {}, ValueError, "beta"),
    ("state-mean-shape", dict(state=jaxbn.BatchNormState(jnp.zeros((1, D)), jnp.ones(D))), {},
     ValueError, "state.mean"),
    ("state-var-shape", dict(state=jaxbn.BatchNormState(jnp.zeros(D), jnp.ones(D + 1))), {},
     ValueError, "state.var"),
    ("state-not-a-state", dict(state=jnp.zeros(D)), {}, TypeError, "state"),
    ("axis-out-of-range", {}, dict(axis=2), ValueError, "axis"),
    ("x-rank-1", dict(x=np.ones(D, np.float32)), {}, ValueError, "x must have at least 2"),
    ("x-bool", dict(x=np.ones((3, D), bool)), {}, TypeError,
     "x must be a floating .* or integer array; got dtype bool"),
    ("one-value-per-feature", dict(x=np.ones((1, D), np.float32)), {}, ValueError,
     "at least 2 values"),
    ("backward-unknown", {}, dict(backward="fast"), ValueError, "backward must be one of"),
    ("momentum-above-1", {}, dict(momentum=1.5), ValueError, "momentum"),
    ("momentum-negative", {}, dict(momentum=-0.1), ValueError, "momentum"),
    ("eps-zero", {}, dict(eps=0.0), ValueError, "eps"),
    ("eps-negative", {}, dict(eps=-1e-5), ValueError, "eps"),
    ("train-string", {}, dict(train="test"), TypeError, "train must be a Python bool"),
    ("train-none", {}, dict(train=None), TypeError, "train must be a Python bool"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("override,options,error,match", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input_batch_norm(override, options, error, match, jit):
    args = {**GOOD, "state": jaxbn.init_batch_norm_state(D), **override}
    kwargs = dict(dict(train=True), **options)
    call = lambda x, gamma, beta, state: jaxbn.batch_norm(x, gamma, beta, state, **kwargs)
    if jit:
        call = jax.jit(call)
    with pytest.raises(error, match=match):
        call(args["x"], args["gamma"], args["beta"], args["state"])


SPATIAL_BAD = [
    ("x-rank-3", dict(x=np.ones((2, 3, 4), np.float32)), {}, ValueError, "x must have 4"),
    ("layout-unknown", {}, dict(layout="CHWN"), ValueError, "layout must be one of"),
    ("gamma-broadcastable", dict(gamma=np.ones((1, 3, 1, 1), np.float32)), {}, ValueError,
     "gamma"),
    ("gamma-wrong-channels-for-NHWC", {}, dict(layout="NHWC"), ValueError, "gamma"),
    ("backward-unknown", {}, dict(backward="naive"), ValueError, "backward"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("override,options,error,match", [b[1:] for b in SPATIAL_BAD],
                         ids=[b[0] for b in SPATIAL_BAD])
def test_bad_input_spatial_batch_norm(override, options, error, match, jit):
    args = {"x": np.ones((2, 3, 4, 5), np.float32), "gamma": np.ones(3, np.float32),
            "beta": np.zeros(3, np.float32), **override}
    kwargs = dict(dict(train=True), **options)
    call = lambda x, g, b: jaxbn.spatial_batch_norm(x, g, b, jaxbn.init_batch_norm_state(3),
                                                    **kwargs)
    if jit:
        call = jax.jit(call)
    with pytest.raises(error, match=match):
        call(args["x"], args["gamma"], args["beta"])


def test_init_state_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_features"):
        jaxbn.init_batch_norm_state(0)
    with pytest.raises(TypeError, match="dtype"):
        jaxbn.init_batch_norm_state(3, jnp.int32)
    state = jaxbn.init_batch_norm_state(3)
    assert np.array_equal(state.mean, np.zeros(3)) and np.array_equal(state.var, np.ones(3))
    assert state.mean.dtype == jnp.float32


@pytest.mark.parametrize("x64", [True, False], ids=["x64", "x32"])
def test_integer_inputs_promote_to_the_default_float(x64):
    """Integer gamma/beta (the ConvolutionalNetworks notebook's) promote like integer x: to
    float32, or float64 under x64."""
    import contextlib

    from helpers import x64_off

    x = np.asarray(rand(0, (10, 2, 4, 4), scale=4.0, offset=10.0))
    with contextlib.nullcontext() if x64 else x64_off():
        state = jaxbn.init_batch_norm_state(2)
        y, _ = jaxbn.spatial_batch_norm(x.astype(np.int64), np.asarray([3, 4]),
                                        np.asarray([6, 7]), state, train=True)
        expected = jnp.float64 if x64 else jnp.float32
        assert y.dtype == expected
        y = np.asarray(y, np.float64)
        np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), [6, 7], atol=1e-4)
        np.testing.assert_allclose(y.std(axis=(0, 2, 3)), [3, 4], rtol=1e-4)
        y2, _ = jaxbn.batch_norm(x[:, 0, 0].astype(np.int32), np.asarray([2, 3, 4, 5]),
                                 np.zeros(4, np.int32), jaxbn.init_batch_norm_state(4),
                                 train=True)
        assert y2.dtype == expected


# ---------------------------------------------------------------------------------------------
# Complex x (Flax's complex batch norm: a complex mean, the real variance mean(|x - mean|^2)).


def _complex(seed, shape, offset=0.0):
    return jax.lax.complex(rand(seed, shape, scale=2.0, offset=offset), rand(seed + 1, shape))


def _as_real(f):
    """A function of complex ``(x, gamma, beta)`` as one of their real and imaginary parts with
    the output's stacked: a real function, which the gradient checks take. JAX's complex
    cotangent convention is what the hand-written rules must follow for this to agree."""
    def real_f(xr, xi, gr, gi, br, bi):
        y = f(jax.lax.complex(xr, xi), jax.lax.complex(gr, gi), jax.lax.complex(br, bi))
        return jnp.stack([jnp.real(y), jnp.imag(y)])
    return real_f


@pytest.mark.parametrize("backward,masked", [("alt", False), ("graph", False), ("alt", True),
                                             ("autodiff", True)],
                         ids=["alt", "graph", "alt-mask", "autodiff-mask"])
def test_complex_vjp_matches_the_oracle_and_finite_differences(backward, masked):
    x = _complex(0, (7, 3), offset=1.5)
    mask = (jnp.arange(21).reshape(7, 3) % 4 != 1) if masked else None  # per entry
    state = jaxbn.init_batch_norm_state(3, jnp.complex128)
    ours = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, backward=backward,
                                            mask=mask)[0]
    naive = lambda x, g, b: reference.normalize(x, g[None], b[None], (0,), 1e-5, mask=mask)[0]
    parts = (jnp.real(x), jnp.imag(x), rand(2, (3,), offset=1.0), rand(3, (3,)), rand(4, (3,)),
             rand(5, (3,)))
    testing.check_vjp(_as_real(ours), _as_real(naive), *parts)
    testing.check_finite_differences(jax.jit(_as_real(ours)), *parts)
    # Real gamma and beta: their cotangents are the real parts.
    real_params = lambda xr, xi, g, b: _as_real(lambda x, g_, b_: ours(x, jnp.real(g_),
                                                                        jnp.real(b_)))(
        xr, xi, g, jnp.zeros(3), b, jnp.zeros(3))
    testing.check_finite_differences(jax.jit(real_params), *parts[:3], parts[4])


def test_complex_statistics_and_running_state():
    x = _complex(6, (9, 2), offset=-1.0)
    state = jaxbn.init_batch_norm_state(2, jnp.complex128)
    assert state.mean.dtype == jnp.complex128 and state.var.dtype == jnp.float64
    y, new = jaxbn.batch_norm(x, None, None, state, train=True, momentum=0.8)
    xs = np.asarray(x)
    mean = xs.mean(0)
    var = (np.abs(xs - mean) ** 2).mean(0)  # real: the variance of complex values
    np.testing.assert_allclose(new.mean, 0.2 * mean, rtol=1e-12)
    np.testing.assert_allclose(new.var, 0.8 + 0.2 * var, rtol=1e-12)
    assert new.mean.dtype == jnp.complex128 and new.var.dtype == jnp.float64
    np.testing.assert_allclose(y, (xs - mean) / np.sqrt(var + 1e-5), rtol=1e-10)
    y_test, same = jaxbn.batch_norm(x, jnp.full(2, 2.0), None, new, train=False)
    np.testing.assert_allclose(y_test, 2.0 * (xs - 0.2 * mean) / np.sqrt(new.var + 1e-5),
                               rtol=1e-10)
    assert same.mean is new.mean or np.array_equal(same.mean, new.mean)
    with pytest.raises(TypeError, match="state.mean must be complex for complex x"):
        jaxbn.batch_norm(x, None, None, jaxbn.init_batch_norm_state(2), train=True)
    with pytest.raises(TypeError, match="gamma must be a floating"):  # complex gamma, real x
        jaxbn.batch_norm(jnp.ones((4, 2)), jnp.ones(2, jnp.complex64), None,
                         jaxbn.init_batch_norm_state(2), train=True)
    with pytest.raises(ValueError, match="renorm= is not available for complex x"):
        jaxbn.batch_norm(x, None, None, state, train=True, renorm=dict(r_max=2.0, d_max=1.0))


# ---------------------------------------------------------------------------------------------
# A mask per entry: each feature's statistics over its own valid entries.


def test_mask_per_entry_gives_each_feature_its_own_statistics():
    x = rand(7, (10, 4), scale=2.0, offset=1.0)
    mask = (jax.random.bernoulli(jax.random.key(1), 0.6, (10, 4)).at[:3, :3].set(True)
            .at[:, 3].set(False))  # feature 3 has no valid entry
    state = jaxbn.BatchNormState(jnp.full(4, 3.0), jnp.full(4, 2.0), jnp.zeros((), jnp.int32))
    ours = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, mask=mask)[0]
    naive = lambda x, g, b: reference.normalize(x, g[None], b[None], (0,), 1e-5, mask=mask)[0]
    gamma, beta = _params(4, jnp.float64)
    testing.check_vjp(ours, naive, x, gamma, beta)
    testing.check_finite_differences(jax.jit(ours), x, gamma, beta)
    _, new = jaxbn.batch_norm(x, gamma, beta, state, train=True, mask=mask, momentum=0.5,
                              running_var="unbiased")
    for f in range(3):
        valid = np.asarray(x)[np.asarray(mask[:, f]), f]
        np.testing.assert_allclose(new.mean[f], 0.5 * 3.0 + 0.5 * valid.mean(), rtol=1e-12)
        np.testing.assert_allclose(new.var[f], 0.5 * 2.0 + 0.5 * valid.var(ddof=1), rtol=1e-12)
    assert float(new.mean[3]) == 3.0 and float(new.var[3]) == 2.0  # kept: nothing to average
    assert int(new.count) == 1
    # spatial: a mask of x's shape, one flag per entry
    xi = rand(8, (3, 2, 4, 4))
    mask_i = rand(9, (3, 2, 4, 4)) > -0.5
    y, _ = jaxbn.spatial_batch_norm(xi, None, None, jaxbn.init_batch_norm_state(2, jnp.float64),
                                    train=True, mask=mask_i)
    expected = reference.normalize(xi, jnp.ones((1, 2, 1, 1)), jnp.zeros((1, 2, 1, 1)),
                                   (0, 2, 3), 1e-5, mask=mask_i)[0]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# One value per feature (a batch of one): refused by default, as PyTorch does; allowed for the
# framework adapters, whose frameworks compute it (variance 0, y = beta).


@pytest.mark.parametrize("backward", ["alt", "graph", "autodiff"])
def test_one_value_per_feature_normalizes_to_beta_when_allowed(backward):
    x = rand(10, (1, 4), offset=2.0)
    gamma, beta = _params(4, jnp.float64)
    state = jaxbn.init_batch_norm_state(4, jnp.float64)
    with pytest.raises(ValueError, match="at least 2 values per feature.*allow_one_value=True"):
        jaxbn.batch_norm(x, gamma, beta, state, train=True, backward=backward)
    ours = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, backward=backward,
                                            allow_one_value=True)[0]
    np.testing.assert_array_equal(ours(x, gamma, beta), beta[None])
    # dx is 0; the rules get it as a difference of terms of size inv_std = 316 (atol).
    testing.check_vjp(ours, lambda x, g, b: reference.normalize(x, g, b, (0,), 1e-5)[0], x,
                      gamma, beta, atol=1e-12)
    _, new = jaxbn.batch_norm(x, gamma, beta, state, train=True, allow_one_value=True)
    np.testing.assert_allclose(new.mean, 0.1 * x[0], rtol=1e-12)
    np.testing.assert_allclose(new.var, 0.9, rtol=1e-12)  # the batch variance of one value: 0


# ---------------------------------------------------------------------------------------------
# The fused epilogue: act(gamma * x_hat + beta + residual) in the normalization's one rule,
# against the oracle's unfused bn -> add -> relu.


def _fused_oracle(axis, activation, with_residual, layout=None):
    """``relu(bn(x) + r)`` composed from the oracle's batch norm (JAX differentiates it)."""
    def f(x, g, b, r):
        feature_axis = axis if layout is None else (1 if layout == "NCHW" else -1)
        y = reference.batch_norm_train(x, g, b, axis=feature_axis)[0]
        y = y + r if with_residual else y
        return jax.nn.relu(y) if activation == "relu" else y
    return f


def _fused(state, activation, with_residual, layout=None, **kw):
    def f(x, g, b, r):
        options = dict(train=True, activation=activation, residual=r if with_residual else None)
        if layout is None:
            return jaxbn.batch_norm(x, g, b, state, **options, **kw)[0]
        return jaxbn.spatial_batch_norm(x, g, b, state, layout=layout, **options, **kw)[0]
    return f


# (backward, activation, residual?, shape, layout or axis, mask?): every rule, both halves of
# the epilogue alone and together, the image layouts and the masked (split) rules.
EPILOGUES = [
    ("alt", "relu", True, (12, 5), -1, False),
    ("graph", "relu", True, (12, 5), 0, False),
    ("autodiff", "relu", True, (12, 5), -1, False),
    ("alt", "relu", False, (12, 5), -1, False),
    ("alt", None, True, (12, 5), -1, False),
    ("alt", "relu", True, (3, 4, 2, 5), "NHWC", False),
    ("graph", "relu", False, (3, 5, 2, 4), "NCHW", False),
    ("alt", "relu", True, (12, 5), -1, True),
    ("autodiff", "relu", True, (12, 5), -1, True),
]
EPILOGUE_IDS = [f"{b}-{a}-{'res' if r else 'nores'}-{where}{'-mask' if m else ''}"
                for b, a, r, _, where, m in EPILOGUES]


@pytest.mark.parametrize("backward, activation, with_residual, shape, where, masked", EPILOGUES,
                         ids=EPILOGUE_IDS)
def test_fused_epilogue_matches_the_unfused_oracle_float64(backward, activation, with_residual,
                                                           shape, where, masked):
    layout, axis = (where, None) if isinstance(where, str) else (None, where)
    c = shape[-1] if layout == "NHWC" else shape[1] if layout == "NCHW" else shape[axis]
    x = rand(0, shape, jnp.float64, scale=2.0, offset=0.5)
    r = rand(5, shape, jnp.float64)
    gamma, beta = _params(c, jnp.float64)
    state = jaxbn.init_batch_norm_state(c, jnp.float64)
    kw = {} if layout is not None else dict(axis=axis)
    ours = _fused(state, activation, with_residual, layout, backward=backward, **kw)
    oracle = _fused_oracle(axis, activation, with_residual, layout)
    if masked:  # the oracle on the valid rows; masked-out rows: output and gradients 0
        valid = np.arange(shape[0]) % 4 != 1
        rows = np.flatnonzero(valid)
        ours_masked = _fused(state, activation, with_residual, mask=valid, backward=backward,
                             axis=axis)
        padded = lambda a: jnp.full(shape, jnp.nan, a.dtype).at[rows].set(a)  # NaN padding

        def on_rows(xv, g, b, rv):
            return ours_masked(padded(xv), g, b, padded(rv))[rows]
        testing.check_vjp(on_rows, oracle, x[rows], gamma, beta, r[rows])
        dy = rand(7, shape, jnp.float64)
        x, r = padded(x[rows]), padded(r[rows])
        y, pullback = jax.vjp(lambda x, r: ours_masked(x, gamma, beta, r), x, r)
        dx, dr = pullback(dy)
        assert not np.any(y[~valid]) and not np.any(dx[~valid]) and not np.any(dr[~valid])
        return
    testing.check_vjp(ours, oracle, x, gamma, beta, r)


@pytest.mark.parametrize("backward", RULES)
def test_fused_epilogue_matches_finite_differences(backward):
    x = rand(0, (10, 3), jnp.float64, scale=2.0, offset=0.5)
    r = rand(5, (10, 3), jnp.float64)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    f = _fused(state, "relu", True, backward=backward)
    testing.check_finite_differences(f, x, *_params(3, jnp.float64), r)
    testing.check_finite_differences(f, x, *_params(3, jnp.float64), r, order=2)


def test_fused_epilogue_keeps_no_extra_full_size_residual():
    """With the ReLU the rule keeps x and y (the layer's output, which the next layer keeps
    anyway), never a mask or the pre-activation of its own."""
    x, r = rand(0, (16, 4), jnp.float32), rand(5, (16, 4), jnp.float32)
    gamma, beta = _params(4, jnp.float32)
    state = jaxbn.init_batch_norm_state(4)
    f = lambda x, r: jaxbn.batch_norm(x, gamma, beta, state, train=True, residual=r,
                                      activation="relu")[0]
    y, pullback = jax.vjp(f, x, r)
    full = [a for a in jax.tree.leaves(pullback) if getattr(a, "shape", ()) == x.shape]
    assert len(full) == 2
    assert any(a is y or np.array_equal(a, y) for a in full)
    assert any(np.array_equal(a, x) for a in full)


def test_fused_epilogue_in_test_mode_and_under_transforms():
    x, r = rand(0, (8, 3), jnp.float64, offset=0.3), rand(5, (8, 3), jnp.float64)
    gamma, beta = _params(3, jnp.float64)
    state = _state(3)
    ours = jaxbn.batch_norm(x, gamma, beta, state, train=False, residual=r, activation="relu")
    running = reference.batch_norm_test(x, gamma, beta, state.mean, state.var)
    np.testing.assert_allclose(ours[0], jax.nn.relu(running + r), rtol=1e-6, atol=1e-6)
    assert ours[1] is not None and np.array_equal(ours[1].mean, state.mean)
    f = _fused(jaxbn.init_batch_norm_state(3, jnp.float64), "relu", True)
    testing.check_transforms(f, x, gamma, beta, r, reduction_size=8)


def test_fused_epilogue_across_a_mapped_axis_is_the_global_batch_norm():
    """vmap with axis_name (the split rules) equals the fused call on the whole batch."""
    x, r = rand(0, (3, 6, 4), jnp.float64, offset=0.5), rand(5, (3, 6, 4), jnp.float64)
    gamma, beta = _params(4, jnp.float64)
    state = jaxbn.init_batch_norm_state(4, jnp.float64)
    mapped = jax.vmap(lambda x, r: jaxbn.batch_norm(x, gamma, beta, state, train=True,
                                                    axis_name="d", residual=r,
                                                    activation="relu")[0], axis_name="d")
    whole = lambda x, r: _fused(state, "relu", True)(x.reshape(18, 4), gamma, beta,
                                                     r.reshape(18, 4)).reshape(3, 6, 4)
    testing.check_vjp(mapped, whole, x, r)


def test_fused_epilogue_scan_and_checkpoint():
    x, r = rand(0, (8, 3), jnp.float32), rand(5, (8, 3), jnp.float32)
    gamma, beta = _params(3, jnp.float32)
    state = jaxbn.init_batch_norm_state(3)
    f = _fused(state, "relu", True)

    def two_layers(body):
        return lambda x, r: jax.lax.scan(lambda h, _: (body(h, gamma, beta, r), None), x,
                                         None, length=2)[0]
    testing.check_vjp(two_layers(jax.checkpoint(f)), two_layers(_fused_oracle(-1, "relu", True)),
                      x, r)


def test_fused_epilogue_bfloat16_rounds_once():
    x, r = rand(0, (32, 4), jnp.bfloat16, offset=0.2), rand(5, (32, 4), jnp.bfloat16)
    gamma, beta = _params(4, jnp.float32)
    state = jaxbn.init_batch_norm_state(4)
    y, _ = jaxbn.batch_norm(x, gamma, beta, state, train=True, residual=r, activation="relu")
    exact = _fused_oracle(-1, "relu", True)(*(a.astype(jnp.float64) for a in (x, gamma, beta, r)))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2 ** -8, atol=2 ** -8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(activation="gelu"), ValueError, "activation must be one of 'relu'; got 'gelu'"),
    (dict(activation=True), ValueError, "activation must be one of"),
    (dict(residual=np.ones((8, 1), np.float32)), ValueError,
     r"residual must have x's shape \(8, 3\).*got shape \(8, 1\)"),
    (dict(residual=np.ones((8, 3), np.float64)), TypeError,
     "residual must have x's dtype float32; got float64. Pass residual.astype"),
    (dict(residual=[[1.0] * 3] * 8), TypeError, "residual must be an array"),
], ids=["unknown-activation", "non-string-activation", "residual-shape", "residual-dtype",
        "residual-list"])
def test_fused_epilogue_bad_arguments(kwargs, error, match):
    x = jnp.ones((8, 3), jnp.float32)
    with pytest.raises(error, match=match):
        jaxbn.batch_norm(x, None, None, jaxbn.init_batch_norm_state(3), train=True, **kwargs)


def test_fused_relu_refuses_complex_x():
    x = jnp.ones((8, 3), jnp.complex64)
    with pytest.raises(TypeError, match="activation='relu' needs real x"):
        jaxbn.batch_norm(x, None, None, jaxbn.init_batch_norm_state(3, jnp.complex64),
                         train=True, activation="relu")
