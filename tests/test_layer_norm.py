"""Layer norm and group norm: gradients against the naive forward, invariants, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference, testing
from jaxbn._layer_norm import normalize_over

from helpers import rand

RULES = ["alt", "graph"]


def _params(n, dtype, seed=1):
    return rand(seed, (n,), dtype, scale=0.5, offset=1.0), rand(seed + 1, (n,), dtype)


def _ln(backward):
    return lambda x, g, b: jaxbn.layer_norm(x, g, b, backward=backward)


def _gn(backward, groups, layout):
    return lambda x, g, b: jaxbn.group_norm(x, g, b, groups=groups, layout=layout,
                                            backward=backward)


def _gn_ref(groups, layout):
    return lambda x, g, b: reference.group_norm(x, g, b, groups=groups, layout=layout)


def _naive_numpy_group_norm(x, gamma, beta, groups, eps=1e-5):
    """From the definition, NCHW, in numpy float64: independent of the library's reshapes."""
    n, c, h, w = x.shape
    y = np.empty_like(x)
    per = c // groups
    for i in range(n):
        for g in range(groups):
            block = x[i, g * per:(g + 1) * per]
            y[i, g * per:(g + 1) * per] = (block - block.mean()) / np.sqrt(block.var() + eps)
    return y * gamma.reshape(1, c, 1, 1) + beta.reshape(1, c, 1, 1)


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 7), (9,)], ids=["6x5", "3x4x7", "single"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_layer_norm_vjp_matches_autodiff(backward, shape, dtype):
    x = rand(0, shape, dtype, scale=2.0, offset=0.5)
    args = (x, *_params(shape[-1], dtype))
    testing.check_vjp(_ln(backward), lambda x, g, b: reference.layer_norm(x, g, b), *args,
                      reference_dtype=jnp.float64, reduction_size=shape[-1])
    y, pullback = jax.vjp(_ln(backward), *args)
    assert y.dtype == dtype and all(g.dtype == dtype for g in pullback(y))


GROUP_CASES = [(1, "NCHW"), (2, "NCHW"), (6, "NCHW"), (1, "NHWC"), (3, "NHWC"), (6, "NHWC")]


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("groups,layout", GROUP_CASES,
                         ids=[f"G{g}-{lay}" for g, lay in GROUP_CASES])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_group_norm_vjp_matches_autodiff(backward, groups, layout, dtype):
    shape = (2, 6, 3, 4) if layout == "NCHW" else (2, 3, 4, 6)
    x = rand(0, shape, dtype, scale=2.0, offset=-1.0)
    testing.check_vjp(_gn(backward, groups, layout), _gn_ref(groups, layout), x,
                      *_params(6, dtype), reference_dtype=jnp.float64, reduction_size=72)


@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_norm_forward_matches_definition(groups):
    x = rand(0, (2, 6, 3, 4), scale=3.0, offset=2.0)
    gamma, beta = _params(6, jnp.float64)
    y = jaxbn.group_norm(x, gamma, beta, groups=groups)
    expected = _naive_numpy_group_norm(np.asarray(x), np.asarray(gamma), np.asarray(beta), groups)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)
    # NHWC is the same computation on transposed data.
    y_nhwc = jaxbn.group_norm(x.transpose(0, 2, 3, 1), gamma, beta, groups=groups, layout="NHWC")
    np.testing.assert_allclose(y_nhwc.transpose(0, 3, 1, 2), expected, rtol=1e-12, atol=1e-12)


def test_group_norm_limits_are_layer_norm_and_instance_norm():
    x = rand(0, (2, 4, 3, 3), offset=1.0)
    ones, zeros = jnp.ones(4), jnp.zeros(4)
    ln = jaxbn.layer_norm(x.reshape(2, -1), jnp.ones(36), jnp.zeros(36)).reshape(x.shape)
    np.testing.assert_allclose(jaxbn.group_norm(x, ones, zeros, groups=1), ln, atol=1e-12)
    inst = jaxbn.layer_norm(x.reshape(2, 4, 9), jnp.ones(9), jnp.zeros(9)).reshape(x.shape)
    np.testing.assert_allclose(jaxbn.group_norm(x, ones, zeros, groups=4), inst, atol=1e-12)


def test_layer_norm_invariants_and_batch_independence():
    x = rand(0, (5, 40), jnp.float32, scale=3.0, offset=-2.0)
    gamma, beta = jnp.full(40, 2.0, jnp.float32), jnp.full(40, 0.5, jnp.float32)
    y = jaxbn.layer_norm(x, gamma, beta)
    np.testing.assert_allclose(y.mean(-1), 0.5, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 2.0, rtol=1e-4)
    # Each example on its own gives the same result: no batch dependence.
    np.testing.assert_allclose(jaxbn.layer_norm(x[2:3], gamma, beta), y[2:3], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(lambda r: jaxbn.layer_norm(r, gamma, beta))(x), y,
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jaxbn.layer_norm)(x, gamma, beta), y, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["layer", "group"])
def test_second_order_and_finite_differences(which):
    if which == "layer":
        x = rand(0, (3, 5), scale=2.0, offset=3.0)
        fn = _ln("alt")
    else:
        x = rand(0, (2, 4, 2, 2), scale=2.0, offset=3.0)
        fn = _gn("alt", 2, "NCHW")
    args = (x, *_params(x.shape[1], jnp.float64))
    jitted = jax.jit(fn)  # one compilation instead of op-by-op dispatch of the eager derivatives
    testing.check_finite_differences(jitted, *args)
    testing.check_finite_differences(jitted, *args, order=2)
    testing.check_transforms(fn, *args)


@pytest.mark.parametrize("which", ["layer", "group"])
def test_large_offset_and_low_precision(which):
    if which == "layer":
        x = rand(0, (4, 2048), jnp.float32, offset=1e4)
        y = jaxbn.layer_norm(x, jnp.ones(2048, jnp.float32), jnp.zeros(2048, jnp.float32))
        std = np.asarray(y, np.float64).std(-1)
    else:
        x = rand(0, (4, 8, 16, 16), jnp.float32, offset=1e4)
        y = jaxbn.group_norm(x, jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32), groups=2)
        std = np.asarray(y, np.float64).reshape(4, 2, -1).std(-1)
    assert np.all(np.abs(std - 1.0) <= 1e-3), std
    for dtype in (jnp.bfloat16, jnp.float16):
        xl = (x - 1e4).astype(dtype)
        if which == "layer":
            fn = lambda x, g, b: jaxbn.layer_norm(x, g, b)
            params = (jnp.ones(2048, jnp.float32), jnp.zeros(2048, jnp.float32))
        else:
            fn = lambda x, g, b: jaxbn.group_norm(x, g, b, groups=2)
            params = (jnp.ones(8, jnp.float32), jnp.zeros(8, jnp.float32))
        y, pullback = jax.vjp(fn, xl, *params)
        dx, dg, _ = pullback(y)
        assert y.dtype == dtype and dx.dtype == dtype and dg.dtype == jnp.float32
        testing.check_vjp(fn, fn, xl, *params, reference_dtype=jnp.float64)


BAD = [
    ("ln-gamma-shape", "layer", dict(gamma=np.ones((1, 4))), {}, ValueError, "gamma"),
    ("ln-beta-shape", "layer", dict(beta=np.ones(3)), {}, ValueError, "beta"),
    ("ln-scalar-x", "layer", dict(x=np.float32(1.0)), {}, ValueError, "x must have at least 1"),
    ("ln-bool-x", "layer", dict(x=np.ones((2, 4), bool)), {}, TypeError,
     "x must be a floating .* or integer array; got dtype bool"),
    ("ln-backward", "layer", {}, dict(backward="fast"), ValueError, "backward must be one of"),
    ("ln-eps", "layer", {}, dict(eps=0.0), ValueError, "eps"),
    ("gn-groups-not-divisor", "group", {}, dict(groups=3), ValueError, "groups must be a positive"),
    ("gn-groups-zero", "group", {}, dict(groups=0), ValueError, "groups must be a positive"),
    ("gn-groups-float", "group", {}, dict(groups=2.0), TypeError, "groups must be an int"),
    ("gn-rank-3", "group", dict(x=np.ones((2, 4, 3))), {}, ValueError, "x must have 4"),
    ("gn-layout", "group", {}, dict(layout="NWHC"), ValueError, "layout must be one of"),
    ("gn-gamma-shape", "group", dict(gamma=np.ones((1, 4, 1, 1))), {}, ValueError, "gamma"),
    ("gn-beta-shape-nhwc", "group", {}, dict(layout="NHWC"), ValueError, "groups|gamma"),
    ("gn-backward", "group", {}, dict(backward="x"), ValueError, "backward"),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("which,override,options,error,match", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_input(which, override, options, error, match, jit):
    if which == "layer":
        args = {"x": np.ones((2, 4)), "gamma": np.ones(4), "beta": np.zeros(4), **override}
        call = lambda x, g, b: jaxbn.layer_norm(x, g, b, **options)
    else:
        args = {"x": np.ones((2, 4, 3, 5)), "gamma": np.ones(4), "beta": np.zeros(4), **override}
        call = lambda x, g, b: jaxbn.group_norm(x, g, b, **{"groups": 2, **options})
    if jit:
        call = jax.jit(call)
    with pytest.raises(error, match=match):
        call(args["x"], args["gamma"], args["beta"])


# ---------------------------------------------------------------------------------------------
# normalize_over: the core behind the framework adapters, statistics over any axes (Flax's
# reduction_axes / feature_axes), layer norm and group norm alike.

OVER_CASES = [
    # (shape, axes, param_axes, groups)
    ((3, 4, 5), (1,), (1,), None),  # a middle axis
    ((2, 3, 4, 5), (1, 2), (3,), None),  # instance norm's form: parameters off the statistics
    ((6, 2, 3), (0,), (1, 2), None),  # over the batch axis: batch norm's arithmetic
    ((3, 4, 8), (0, 1), (2,), 4),  # group norm over the whole batch
    ((2, 3, 2, 2, 4), (0, 1, 3), (4,), 2),  # reduced axes with a gap
]
OVER_IDS = ["middle", "instance", "over-batch", "group-whole-batch", "group-gap"]


def _over_reference(shape, axes, param_axes, groups):
    if groups is not None:  # the oracle's loop over groups, channels last
        return lambda x, g, b: reference.group_norm(x, g, b, groups=groups, layout="NWC",
                                                    axes=axes)
    view = tuple(n if a in param_axes else 1 for a, n in enumerate(shape))
    return lambda x, g, b: reference.normalize(x, g.reshape(view), b.reshape(view), axes,
                                               1e-5)[0]


@pytest.mark.parametrize("backward", RULES)
@pytest.mark.parametrize("shape,axes,param_axes,groups", OVER_CASES, ids=OVER_IDS)
def test_normalize_over_any_axes_matches_the_oracle(backward, shape, axes, param_axes, groups):
    x = rand(0, shape, scale=2.0, offset=1.0)
    pshape = tuple(shape[a] for a in param_axes)
    gamma, beta = rand(1, pshape, offset=1.0), rand(2, pshape)
    ours = lambda x, g, b: normalize_over(x, g, b, axes=axes, param_axes=param_axes,
                                          groups=groups, backward=backward)
    testing.check_vjp(ours, _over_reference(shape, axes, param_axes, groups), x, gamma, beta)


@pytest.mark.parametrize("case", [0, 4], ids=["middle", "group-gap"])
def test_normalize_over_finite_differences_and_mask(case):
    shape, axes, param_axes, groups = OVER_CASES[case]
    x = rand(3, shape, scale=2.0)
    mask = rand(4, shape) > -0.8
    pshape = tuple(shape[a] for a in param_axes)
    ours = lambda x, g, b: normalize_over(x, g, b, axes=axes, param_axes=param_axes,
                                          groups=groups, mask=mask)
    testing.check_finite_differences(jax.jit(ours), x, rand(5, pshape, offset=1.0), rand(6, pshape))
    if groups is None:
        view = tuple(n if a in param_axes else 1 for a, n in enumerate(shape))
        naive = lambda x, g, b: reference.normalize(x, g.reshape(view), b.reshape(view), axes,
                                                    1e-5, mask=mask)[0]
        testing.check_vjp(ours, naive, x, rand(5, pshape, offset=1.0), rand(6, pshape))


def test_normalize_over_a_sharded_axis_under_vmap_is_the_whole_axis():
    x = rand(7, (4, 6, 3), scale=2.0, offset=0.5)  # the reduced axis 1 split over 2 "devices"
    gamma, beta = rand(8, (3,), offset=1.0), rand(9, (3,))
    whole = lambda x, g, b: normalize_over(x, g, b, axes=1, param_axes=2)

    def sharded(x, g, b):
        parts = x.reshape(4, 2, 3, 3).transpose(1, 0, 2, 3)
        y = jax.vmap(lambda p: normalize_over(p, g, b, axes=1, param_axes=2, axis_name="d"),
                     axis_name="d")(parts)
        return y.transpose(1, 0, 2, 3).reshape(4, 6, 3)
    testing.check_vjp(sharded, whole, x, gamma, beta)


def test_normalize_over_bad_arguments_name_the_fix():
    x = jnp.ones((2, 4, 6))
    with pytest.raises(ValueError, match="axes must name each axis of x once"):
        normalize_over(x, None, None, axes=(1, -2), param_axes=2)
    with pytest.raises(ValueError, match="param_axes must be in"):
        normalize_over(x, None, None, axes=1, param_axes=3)
    with pytest.raises(ValueError, match="the one channel axis, not among axes"):
        normalize_over(x, None, None, axes=(1, 2), param_axes=2, groups=2)
    with pytest.raises(ValueError, match="groups must be a positive divisor of the 6 channels"):
        normalize_over(x, None, None, axes=1, param_axes=2, groups=4)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4, 6\)"):
        normalize_over(x, jnp.ones(24), None, axes=1, param_axes=(1, 2))
    with pytest.raises(NameError, match="axis_name 'd' is not bound"):
        normalize_over(x, None, None, axes=1, param_axes=2, axis_name="d")
