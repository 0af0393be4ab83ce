"""Synchronized batch norm (axis_name) and masked statistics.

Single-device cases run here; the 8-device shard_map checks run in a subprocess
(tests/multidevice_check.py) because the device count must be set before JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import reference, testing

from helpers import rand


@pytest.mark.slow
def test_eight_device_shard_map_matches_one_device():
    script = os.path.join(os.path.dirname(__file__), "multidevice_check.py")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "multi-device checks passed" in proc.stdout


SPLIT_RULES = ["alt", "autodiff"]


@pytest.mark.parametrize("backward", SPLIT_RULES)
@pytest.mark.parametrize("layout", ["flat", "NCHW"])
def test_vmap_axis_name_over_examples_equals_whole_batch(backward, layout):
    shape = (6, 4) if layout == "flat" else (6, 3, 2, 2)
    d = shape[1]
    x = rand(0, shape, scale=2.0, offset=1.0)
    gamma, beta = rand(1, (d,), offset=1.0), rand(2, (d,))
    state = jaxbn.init_batch_norm_state(d, jnp.float64)

    def whole(x, g, b):
        fn = jaxbn.batch_norm if layout == "flat" else jaxbn.spatial_batch_norm
        return fn(x, g, b, state, train=True, backward=backward)

    def per_example(x, g, b):
        def one(xi):
            fn = jaxbn.batch_norm if layout == "flat" else jaxbn.spatial_batch_norm
            y, new = fn(xi[None], g, b, state, train=True, backward=backward, axis_name="batch")
            return y[0], new
        ys, news = jax.vmap(one, axis_name="batch")(x)
        return ys, jax.tree.map(lambda a: a[0], news)

    testing.check_vjp(lambda x, g, b: per_example(x, g, b), lambda x, g, b: whole(x, g, b),
                      x, gamma, beta, has_aux=True, compare_aux=True)
    for a, b in zip(per_example(x, gamma, beta)[1], whole(x, gamma, beta)[1]):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_axis_name_counts_the_global_batch():
    g, b = jnp.ones(3), jnp.zeros(3)
    state = jaxbn.init_batch_norm_state(3)
    one = lambda xi: jaxbn.batch_norm(xi[None], g, b, state, train=True, axis_name="i")[0]
    jax.vmap(one, axis_name="i")(jnp.ones((2, 3)))  # 2 values per feature globally: fine
    with pytest.raises(ValueError, match="at least 2 values"):
        jax.vmap(one, axis_name="i")(jnp.ones((1, 3)))


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("where", ["mask", "axis_name"])
def test_graph_rule_is_rejected_where_it_cannot_run(where, jit):
    """backward= is honoured or refused, never silently swapped for another rule."""
    x, g, b = rand(0, (6, 3)), jnp.ones(3), jnp.zeros(3)
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    if where == "mask":
        fn = lambda x: jaxbn.batch_norm(x, g, b, state, train=True, backward="graph",
                                        mask=jnp.ones(6, bool))[0]
    else:
        fn = jax.vmap(lambda xi: jaxbn.batch_norm(xi[None], g, b, state, train=True,
                                                  backward="graph", axis_name="i")[0],
                      axis_name="i")
    with pytest.raises(ValueError, match="backward='graph' is not available with mask= or "
                                         "axis_name=.*'alt' or 'autodiff'"):
        (jax.jit(fn) if jit else fn)(x)


def _valid_subset_reference(x, g, b, mask):
    """Batch norm of the valid rows alone (a gather, the naive forward), zeros elsewhere: it
    never looks at a masked-out row, so it cannot share a masking bug with the implementation."""
    rows = np.flatnonzero(np.asarray(mask))
    y_valid = reference.batch_norm_train(x[rows], g, b)[0]
    return jnp.zeros_like(x).at[rows].set(y_valid)


PADDING = {"finite": None, "nan": np.nan, "inf": np.inf, "huge": 1e30}


@pytest.mark.parametrize("padding", list(PADDING))
@pytest.mark.parametrize("backward", SPLIT_RULES)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["f64", "f32"])
def test_masked_vjp_matches_the_valid_subset_whatever_the_padding(backward, dtype, padding):
    x = rand(0, (10, 4), scale=2.0, offset=1.0)
    mask = jnp.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], bool)
    padded = x if PADDING[padding] is None else jnp.where(mask[:, None], x, PADDING[padding])
    p = (rand(1, (4,), offset=1.0), rand(2, (4,)))
    state = jaxbn.init_batch_norm_state(4, jnp.float64)

    def fn(x, g, b):
        y, new = jaxbn.batch_norm(x, g, b, state, train=True, mask=mask, backward=backward,
                                  momentum=0.0)
        return y, new

    args = (padded.astype(dtype), *(a.astype(dtype) for a in p))
    # The reference never sees the padding: it gathers the valid rows of the clean x.
    reference_fn = lambda _, g, b: _valid_subset_reference(x.astype(g.dtype), g, b, mask)
    testing.check_vjp(lambda *a: fn(*a)[0], reference_fn, *args, argnums=(1, 2),
                      reference_dtype=jnp.float64, reduction_size=10)
    valid_rows = lambda f: (lambda x, g, b: f(x, g, b)[np.asarray(mask)])
    testing.check_vjp(valid_rows(lambda *a: fn(*a)[0]), valid_rows(
        lambda x, g, b: _valid_subset_reference(x, g, b, mask)),
        x.astype(dtype), *args[1:], reference_dtype=jnp.float64, reduction_size=10)
    (y, new), pullback = jax.vjp(fn, *args)
    dx = pullback((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))[0]
    assert np.all(np.isfinite(dx)) and np.all(np.asarray(dx)[~np.asarray(mask)] == 0)
    valid = np.asarray(x)[np.asarray(mask)]
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    np.testing.assert_allclose(new.mean, valid.mean(0), rtol=tol)
    np.testing.assert_allclose(new.var, valid.var(0), rtol=tol)


def test_masked_statistics_equal_statistics_of_the_valid_subset():
    x = rand(0, (4, 3, 5, 6), offset=1e4, dtype=jnp.float32)
    mask = rand(1, (4, 5, 6)) > 0.3
    state = jaxbn.init_batch_norm_state(3)
    nan_padded = jnp.where(mask[:, None], x, jnp.nan)
    y, new = jaxbn.spatial_batch_norm(nan_padded, jnp.ones(3, jnp.float32),
                                      jnp.zeros(3, jnp.float32), state, train=True, momentum=0.0,
                                      mask=mask)
    assert np.all(np.moveaxis(np.asarray(y), 1, -1)[~np.asarray(mask)] == 0)
    valid = np.moveaxis(np.asarray(x, np.float64), 1, -1)[np.asarray(mask)]
    np.testing.assert_allclose(new.mean, valid.mean(0), rtol=1e-6)
    np.testing.assert_allclose(new.var, valid.var(0), rtol=2e-3)  # offset 1e4, float32
    y_valid = np.moveaxis(np.asarray(y, np.float64), 1, -1)[np.asarray(mask)]
    assert np.all(np.abs(y_valid.std(0) - 1.0) <= 1e-3)
    # NHWC with the same mask gives the same statistics.
    _, new_nhwc = jaxbn.spatial_batch_norm(x.transpose(0, 2, 3, 1), jnp.ones(3, jnp.float32),
                                           jnp.zeros(3, jnp.float32), state, train=True,
                                           momentum=0.0, mask=mask, layout="NHWC")
    np.testing.assert_allclose(new_nhwc.mean, new.mean, rtol=1e-6)


def test_vmap_axis_name_with_uneven_masks_is_count_weighted():
    """Four 'devices' (vmap) with different numbers of valid rows: one global batch."""
    counts = jnp.array([1, 6, 3, 0])
    mask = jnp.arange(6)[None, :] < counts[:, None]
    x = jnp.where(mask[..., None], rand(0, (4, 6, 3), offset=5.0), jnp.inf)
    g, b = rand(1, (3,), offset=1.0), rand(2, (3,))
    state = jaxbn.init_batch_norm_state(3, jnp.float64)
    per_device = jax.vmap(lambda xs, m: jaxbn.batch_norm(xs, g, b, state, train=True,
                                                         axis_name="dev", mask=m, momentum=0.0),
                          axis_name="dev")
    y, new = per_device(x, mask)
    valid = np.asarray(x)[np.asarray(mask)]
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(new.mean[0], valid.mean(0), rtol=1e-12)
    np.testing.assert_allclose(new.var[0], valid.var(0), rtol=1e-12)
    # Equal to the single call on the flattened batch with the flattened mask.
    y1, _ = jaxbn.batch_norm(x.reshape(24, 3), g, b, state, train=True, mask=mask.reshape(24))
    np.testing.assert_allclose(y.reshape(24, 3), y1, rtol=1e-12)


@pytest.mark.parametrize("backward", SPLIT_RULES)
def test_all_masked_gives_no_nan_and_keeps_running_statistics(backward):
    x = rand(0, (5, 3))
    state = jaxbn.BatchNormState(jnp.array([1.0, 2.0, 3.0]), jnp.array([4.0, 5.0, 6.0]))
    fn = lambda x, g: jaxbn.batch_norm(x, g, jnp.zeros(3), state, train=True,
                                       mask=jnp.zeros(5, bool), backward=backward)
    (y, new), pullback = jax.vjp(fn, x, jnp.ones(3))
    grads = pullback((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new)))
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(g)) for g in grads)
    np.testing.assert_array_equal(new.mean, state.mean)
    np.testing.assert_array_equal(new.var, state.var)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bad_mask_and_axis_name(jit):
    x, g, b = jnp.ones((4, 3)), jnp.ones(3), jnp.zeros(3)
    state = jaxbn.init_batch_norm_state(3)
    call = lambda x, **kw: jaxbn.batch_norm(x, g, b, state, train=True, **kw)[0]
    wrap = jax.jit if jit else (lambda f: f)
    with pytest.raises(TypeError, match="mask must be a boolean"):
        wrap(lambda x: call(x, mask=jnp.ones(4)))(x)
    with pytest.raises(ValueError, match=r"mask must have x's shape without the feature axis"):
        wrap(lambda x: call(x, mask=jnp.ones((4, 2), bool)))(x)
    with pytest.raises(ValueError, match=r"mask must have x's shape"):
        wrap(lambda x: call(x, mask=jnp.ones(3, bool)))(x)
    with pytest.raises(ValueError, match="axis_name 'batch' is not bound"):
        wrap(lambda x: call(x, axis_name="batch"))(x)
    with pytest.raises(ValueError, match=r"mask must have x's shape"):
        jaxbn.spatial_batch_norm(jnp.ones((2, 3, 4, 4)), g, b, state, train=True,
                                 mask=jnp.ones((2, 3, 4, 2), bool))


@pytest.mark.slow
def test_data_parallel_example_runs():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.data_parallel", "--steps", "12"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "largest loss difference" in proc.stdout
