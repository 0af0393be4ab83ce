"""The native CPU kernels against the jnp rules they implement, and what they must keep:
accuracy at large offsets, vmap without a loop, bitwise determinism, derivatives of the rule.

The extension must be built here (``pip install -e .`` builds it wherever a C++ compiler is);
``JAXBN_ALLOW_NO_NATIVE=1`` runs the suite on a machine without one.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbn
from jaxbn import _native, testing
from tests.helpers import rand

if not _native.native_status()["built"]:
    if os.environ.get("JAXBN_ALLOW_NO_NATIVE") != "1":
        raise RuntimeError(f"jaxbn's native kernels are not built: "
                           f"{_native.native_status()['reason']}")
    pytest.skip("native kernels not built (JAXBN_ALLOW_NO_NATIVE=1)", allow_module_level=True)



@pytest.fixture(autouse=True)
def _default_switch(monkeypatch):
    """These tests set the switch themselves (CI also runs the suite with JAXBN_NATIVE=0)."""
    monkeypatch.delenv(_native.ENV, raising=False)


CASES = [  # (shape, layout or feature axis)
    ((96, 24), -1),
    ((6, 5, 7, 12), "NHWC"),
    ((3, 8, 4, 40), "NCHW"),  # inner size not a multiple of 8
    ((2000, 3), -1),  # several blocks of rows
    ((4, 1100), -1),  # two channel chunks
    ((37, 40), -1),  # vectors across channels with a channel tail; a tail of rows
]
F32, BF16, F16, F64 = jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64
MATRIX = ([(dtype, case) for dtype in (F32, F64) for case in CASES]
          + [(dtype, case) for dtype in (BF16, F16) for case in (CASES[1], CASES[2], CASES[5])])


def _bn(layout, backward="alt", momentum=0.9, activation=None):
    def f(x, gamma, beta):
        state = jaxbn.init_batch_norm_state(gamma.shape[0], gamma.dtype)
        kw = dict(train=True, backward=backward, momentum=momentum, activation=activation)
        if isinstance(layout, str):
            y, s = jaxbn.spatial_batch_norm(x, gamma, beta, state, layout=layout, **kw)
        else:
            y, s = jaxbn.batch_norm(x, gamma, beta, state, axis=layout, **kw)
        return y, (s.mean, s.var)
    return f


def _channels(shape, layout):
    return shape[1] if layout == "NCHW" else shape[-1]


def _vjp(native: bool, f, args, dy):
    """Output, statistics and VJP with the native kernels on or off for the whole computation
    (the switch is read when the forward and the backward are traced)."""
    old = os.environ.get(_native.ENV)
    os.environ[_native.ENV] = "1" if native else "0"
    def run(args, dy):
        y, pullback, stats = jax.vjp(f, *args, has_aux=True)
        return y, stats, pullback(dy)
    try:  # jitted (traced here, under the switch): eager op-by-op dispatch made these slow
        return jax.jit(run)(args, dy)
    finally:
        if old is None:
            del os.environ[_native.ENV]
        else:
            os.environ[_native.ENV] = old


def _inputs(shape, layout, dtype, offset=3.0):
    c = _channels(shape, layout)
    return (rand(0, shape, dtype, 2.0, offset), rand(1, (c,), jnp.float32, 0.5, 1.0),
            rand(2, (c,), jnp.float32))


@pytest.mark.parametrize("dtype, case", MATRIX,
                         ids=[f"{jnp.dtype(d).name}-{c[0]}-{c[1]}" for d, c in MATRIX])
def test_native_matches_the_jnp_rule(dtype, case):
    shape, layout = case
    x, gamma, beta = _inputs(shape, layout, dtype)
    if dtype == jnp.float64:
        gamma, beta = gamma.astype(dtype), beta.astype(dtype)
    dy = rand(3, shape, dtype)
    f = _bn(layout)
    assert "jaxbn_batch_norm_forward" in str(jax.make_jaxpr(f)(x, gamma, beta))
    native, reference = _vjp(True, f, (x, gamma, beta), dy), _vjp(False, f, (x, gamma, beta), dy)
    tol = {jnp.float64: 1e-12, jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}[dtype]
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(reference)):
        assert a.dtype == b.dtype and a.shape == b.shape
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a64, b64, rtol=tol, atol=tol * np.max(np.abs(b64)))


def test_float64_rule_matches_finite_differences_on_the_native_path():
    x, gamma, beta = (a.astype(jnp.float64) for a in _inputs((40, 6), -1, jnp.float64))
    f = lambda x, g, b: _bn(-1)(x, g, b)[0]
    assert "jaxbn_batch_norm_backward" in str(jax.make_jaxpr(
        lambda x: jax.vjp(lambda x: f(x, gamma, beta), x)[1](x))(x))
    testing.check_finite_differences(jax.jit(f), x, gamma, beta)


def _float64_batch_norm(x, gamma, beta, dy, channel_axis):
    """Mean, variance, y and dx of train-mode batch norm in float64 numpy (the same float32
    inputs), for the error of each float32 path."""
    x, gamma, beta, dy = (np.moveaxis(np.asarray(a, np.float64), channel_axis, -1) if a.ndim > 1
                          else np.asarray(a, np.float64) for a in (x, gamma, beta, dy))
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    inv_std = 1.0 / np.sqrt(var + 1e-5)
    x_hat = (x - mean) * inv_std
    g = dy * gamma
    dx = inv_std * (g - g.mean(axes) - x_hat * (g * x_hat).mean(axes))
    back = lambda a: np.moveaxis(a, -1, channel_axis)
    return mean, var, back(gamma * x_hat + beta), back(dx)


EXACTNESS = [  # (shape, layout or feature axis, offset, scale)
    pytest.param((64, 10), -1, 3.0, 2.0, id="(64, 10)--1"),
    pytest.param((8, 6, 5, 7), "NCHW", 3.0, 2.0, id="(8, 6, 5, 7)-NCHW"),
    pytest.param((8, 5, 7, 6), "NHWC", 3.0, 2.0, id="(8, 5, 7, 6)-NHWC"),
    # 4M values per feature at offset 100; slow (CI's slow job runs it)
    pytest.param((1 << 22, 2), -1, 100.0, 1.0, id="(4194304, 2)--1", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape, layout", [((64, 10), -1), ((8, 6, 5, 7), "NCHW"),
                                           ((8, 5, 7, 6), "NHWC")])
def test_the_backward_takes_the_forwards_float64_statistics(shape, layout, activation):
    """At offset 1e4 with std 1 a float32 mean is off by up to 5e-4 standard deviations, which
    costs dx and dgamma 1e-5 to 3e-4 relative when the backward centres x with it (as the jnp
    rule does). The native backward gets the forward's float64 mean and inv_std (float32 value
    plus low part) and stays within a few float32 roundings of float64, the ReLU epilogue's
    masked sums included."""
    channel_axis = 1 if layout == "NCHW" else len(shape) - 1
    c = shape[channel_axis]
    x = rand(0, shape, jnp.float32, 1.0, 1e4)
    gamma, beta = rand(1, (c,), jnp.float32, 0.5, 1.0), rand(2, (c,), jnp.float32)
    dy = rand(3, shape, jnp.float32)
    y, _, (dx, dgamma, _) = _vjp(True, _bn(layout, activation=activation), (x, gamma, beta), dy)
    dz = np.asarray(dy, np.float64) * (np.asarray(y) > 0 if activation else 1.0)  # y's mask
    _, _, _, dx64 = _float64_batch_norm(x, gamma, beta, dz, channel_axis)
    axes = tuple(a for a in range(len(shape)) if a != channel_axis)
    x64 = np.asarray(x, np.float64)
    x_hat = (x64 - x64.mean(axes, keepdims=True)) / np.sqrt(x64.var(axes, keepdims=True) + 1e-5)
    dgamma64 = (dz * x_hat).sum(axes)
    for got, want in ((dx, dx64), (dgamma, dgamma64)):
        error = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
        assert error < 2e-7, error


@pytest.mark.parametrize("shape, layout, offset, scale", EXACTNESS)
def test_native_is_as_exact_as_the_jnp_rule(shape, layout, offset, scale):
    """Against float64 on the same float32 inputs, the native mean, variance, y and dx are at
    least as exact as the jnp rule's (the kernels sum in float64 and round once)."""
    channel_axis = 1 if layout == "NCHW" else len(shape) - 1
    c = shape[channel_axis]
    x = rand(0, shape, jnp.float32, scale, offset)
    gamma, beta = rand(1, (c,), jnp.float32, 0.5, 1.0), rand(2, (c,), jnp.float32)
    dy = rand(3, shape, jnp.float32)
    expected = _float64_batch_norm(x, gamma, beta, dy, channel_axis)
    f = _bn(layout, momentum=0.0)  # the new running statistics are the batch's
    errors = {}
    for native in (True, False):
        y, (mean, var), (dx, _, _) = _vjp(native, f, (x, gamma, beta), dy)
        errors[native] = [np.max(np.abs(np.asarray(a, np.float64) - e)) / np.max(np.abs(e))
                          for a, e in zip((mean, var, y, dx), expected)]
    for name, native, jnp_rule in zip(("mean", "var", "y", "dx"), errors[True], errors[False]):
        assert native <= 1.5 * jnp_rule + 1e-9, (name, native, jnp_rule)
    if shape[0] == 1 << 22:  # PyTorch 2.13's float32 CPU kernel: y mean 0.82, std 43% off here
        y64 = np.asarray(_vjp(True, f, (x, gamma, beta), dy)[0], np.float64)
        x_hat = (y64 - np.asarray(beta)) / np.asarray(gamma)
        np.testing.assert_allclose(x_hat.mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(x_hat.std(0), 1.0, atol=1e-5)


def test_vmap_batches_the_kernel_without_a_loop_and_never_pools_statistics():
    xs = rand(0, (5, 64, 8), jnp.float32, 2.0, 1.0) * jnp.arange(1, 6)[:, None, None]
    gamma, beta = rand(1, (8,), jnp.float32, 0.5, 1.0), rand(2, (8,), jnp.float32)
    dys = rand(3, xs.shape, jnp.float32)
    f = lambda x: _bn(-1)(x, gamma, beta)[0]

    def vjp_all(x, dy):
        y, pullback = jax.vjp(f, x)
        return y, pullback(dy)[0]

    jaxpr = str(jax.make_jaxpr(jax.vmap(vjp_all))(xs, dys))
    assert jaxpr.count("jaxbn_batch_norm_forward") == 1
    assert jaxpr.count("jaxbn_batch_norm_backward") == 1
    assert "while" not in jaxpr and "scan" not in jaxpr
    y, dx = jax.jit(jax.vmap(vjp_all))(xs, dys)
    for i in range(xs.shape[0]):  # each batch on its own statistics
        y_i, dx_i = vjp_all(xs[i], dys[i])
        np.testing.assert_allclose(y[i], y_i, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx[i], dx_i, rtol=1e-5, atol=1e-6)
    # vmap over the parameters too (one gamma per batch).
    gammas = rand(4, (5, 8), jnp.float32, 0.5, 1.0)
    g = jax.vmap(lambda x, gm: _bn(-1)(x, gm, beta)[0])(xs, gammas)
    np.testing.assert_allclose(g[2], _bn(-1)(xs[2], gammas[2], beta)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=lambda d: jnp.dtype(d).name)
def test_a_features_results_do_not_depend_on_its_position(dtype):
    """Features last, the kernels run 8 or 16 features per vector and the rest one by one: a
    feature moved from a vector's lanes to the tail gets the same bits (37 rows: a row tail too)."""
    x = rand(0, (37, 40), dtype, 3.0, 5.0)
    perm = np.arange(40)
    perm[[3, 36]] = perm[[36, 3]]
    state = jaxbn.init_batch_norm_state(40)
    f = jax.jit(lambda x: jaxbn.batch_norm(x, jnp.ones(40), jnp.zeros(40), state, train=True,
                                           momentum=0.0))
    (y, s), (y_moved, s_moved) = f(x), f(x[:, perm])
    np.testing.assert_array_equal(np.asarray(y)[:, perm], np.asarray(y_moved))
    np.testing.assert_array_equal(np.asarray(s.mean)[perm], np.asarray(s_moved.mean))
    np.testing.assert_array_equal(np.asarray(s.var)[perm], np.asarray(s_moved.var))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_channel_by_channel_gives_the_two_pass_bits(dtype, fused):
    """NCHW with long spans per channel and at least 16 (b, c) runs each channel's sums and then
    its elementwise pass (x still in L2); 8 channels take the two passes over the whole batch.
    The first 8 channels of 16 get the bits they get alone: y, statistics, dx, dgamma, dbeta and,
    fused (ReLU + residual), the residual's gradient. 24 x 24 inner values: 4 blocks of rows."""
    x, dy, r = (rand(seed, (4, 16, 24, 24), dtype, 2.0, 3.0) for seed in (0, 1, 2))
    gamma, beta = rand(3, (16,), jnp.float32, 0.5, 1.0), rand(4, (16,), jnp.float32)

    def vjp(x, dy, r, gamma, beta):
        def f(x, gamma, beta, r):
            state = jaxbn.init_batch_norm_state(gamma.shape[0])
            kw = dict(activation="relu", residual=r) if fused else {}
            y, s = jaxbn.spatial_batch_norm(x, gamma, beta, state, train=True, momentum=0.0, **kw)
            return y, (s.mean, s.var)
        y, pullback, stats = jax.vjp(f, x, gamma, beta, r, has_aux=True)
        return y, stats, pullback(dy)

    run = jax.jit(vjp)
    every = jax.tree.leaves(run(x, dy, r, gamma, beta))
    first = jax.tree.leaves(run(x[:, :8], dy[:, :8], r[:, :8], gamma[:8], beta[:8]))
    assert len(every) == len(first) == 7  # y, mean, var, dx, dgamma, dbeta, dr
    for a, b in zip(every, first):
        a = np.asarray(a)
        np.testing.assert_array_equal(a[:, :8] if a.ndim == 4 else a[:8], np.asarray(b))


def test_bitwise_deterministic_across_calls_and_thread_counts(monkeypatch):
    x, gamma, beta = _inputs((65536, 16), -1, jnp.float32, offset=50.0)
    dy = rand(3, x.shape, jnp.float32)

    @jax.jit
    def step(x, dy):
        y, pullback = jax.vjp(lambda x, g, b: _bn(-1)(x, g, b)[0], x, gamma, beta)
        return y, pullback(dy)

    first = jax.tree.leaves(step(x, dy))
    for threads in ("2", "1", "8", "3"):  # more ranges than cores: some queue on XLA's pool
        monkeypatch.setenv("JAXBN_NUM_THREADS", threads)
        for a, b in zip(jax.tree.leaves(step(x, dy)), first):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_concurrent_calls_share_the_thread_pool_and_keep_their_bits(monkeypatch):
    """Calls from several Python threads at once hand their ranges to the same XLA pool."""
    monkeypatch.setenv("JAXBN_NUM_THREADS", "4")
    x, gamma, beta = _inputs((32768, 48), -1, jnp.float32, offset=50.0)
    dys = [rand(10 + i, x.shape, jnp.float32) for i in range(6)]

    @jax.jit
    def step(x, dy):
        y, pullback = jax.vjp(lambda x, g, b: _bn(-1)(x, g, b)[0], x, gamma, beta)
        return y, pullback(dy)

    alone = [jax.tree.leaves(jax.block_until_ready(step(x, dy))) for dy in dys]
    with concurrent.futures.ThreadPoolExecutor(len(dys)) as pool:
        together = list(pool.map(lambda dy: jax.tree.leaves(jax.block_until_ready(step(x, dy))),
                                 dys * 3))
    for i, leaves in enumerate(together):
        for a, b in zip(leaves, alone[i % len(dys)]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_second_order_and_hessian_differentiate_the_jnp_rule():
    x, gamma, beta = (a.astype(jnp.float64) for a in _inputs((12, 3), -1, jnp.float64))
    w = rand(5, x.shape, jnp.float64)
    loss = lambda x, g: jnp.sum(w * _bn(-1)(x, g, beta)[0] ** 2)
    grads = {}
    for mode in ("1", "0"):
        os.environ[_native.ENV] = mode
        try:
            grads[mode] = jax.jit(lambda x, g: (
                jax.grad(lambda x: jnp.sum(jax.grad(loss)(x, g) ** 2))(x),
                jax.hessian(loss, argnums=1)(x, g)))(x, gamma)
        finally:
            del os.environ[_native.ENV]
    for a, b in zip(grads["1"], grads["0"]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    testing.check_finite_differences(jax.jit(lambda g: loss(x, g)), gamma, order=2)


def test_switch_and_status(monkeypatch):
    x, gamma, beta = _inputs((32, 4), -1, jnp.float32)
    assert jaxbn.native_status() == {"built": True, "enabled": True,
                                     "reason": "native CPU kernels in use"}
    monkeypatch.setenv("JAXBN_NATIVE", "0")
    assert jaxbn.native_status()["enabled"] is False and "JAXBN_NATIVE=0" in \
        jaxbn.native_status()["reason"]
    assert "jaxbn_batch_norm" not in str(jax.make_jaxpr(_bn(-1))(x, gamma, beta))
    monkeypatch.delenv("JAXBN_NATIVE")
    # graph, autodiff, layer norm and masks stay on the jnp rules.
    assert "jaxbn_batch_norm" not in str(jax.make_jaxpr(_bn(-1, "graph"))(x, gamma, beta))
    assert "jaxbn_batch_norm" not in str(jax.make_jaxpr(
        lambda x: jaxbn.layer_norm(x, gamma, beta))(x))


def test_without_the_extension_jaxbn_warns_once_and_runs_the_jnp_rules(monkeypatch):
    monkeypatch.setattr(_native, "_kernels", None)
    monkeypatch.setattr(_native, "_UNAVAILABLE", "the extension jaxbn._kernels is not built (test)")
    monkeypatch.setattr(_native, "_warned", [])
    x, gamma, beta = _inputs((32, 4), -1, jnp.float32)
    with pytest.warns(RuntimeWarning, match="not built .* jnp rules"):
        jaxpr = str(jax.make_jaxpr(_bn(-1))(x, gamma, beta))
    assert "jaxbn_batch_norm" not in jaxpr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bn(-1)(x, gamma, beta)  # once only
    assert jaxbn.native_status()["built"] is False


def test_an_extension_xla_refuses_falls_back_with_the_reason(monkeypatch):
    reason = "XLA refused the extension (API version); rebuild it against the installed jaxlib"
    monkeypatch.setattr(_native, "_registration_error", lambda: reason)
    monkeypatch.setattr(_native, "_warned", [])
    x, gamma, beta = _inputs((32, 4), -1, jnp.float32)
    assert jaxbn.native_status() == {"built": True, "enabled": False, "reason": reason}
    with pytest.warns(RuntimeWarning, match="XLA refused"):
        jaxpr = str(jax.make_jaxpr(_bn(-1))(x, gamma, beta))
    assert "jaxbn_batch_norm" not in jaxpr


def test_an_extension_from_another_jaxbn_is_refused_before_xla_sees_it(monkeypatch):
    """An extension left from an older source tree has other operands (this one's backward
    takes the forward's statistics): it is refused by its interface number, with the fix."""
    assert _native._kernels.INTERFACE == _native._INTERFACE
    registered = []
    monkeypatch.setattr(jax.ffi, "register_ffi_target", lambda *a, **k: registered.append(a))
    monkeypatch.setattr(_native._kernels, "INTERFACE", _native._INTERFACE - 1)
    reason = _native._registration_error.__wrapped__()
    assert f"kernel interface {_native._INTERFACE - 1}, this jaxbn needs" in reason
    assert "pip install --no-build-isolation -e ." in reason and registered == []
    monkeypatch.delattr(_native._kernels, "INTERFACE")  # built before the number existed
    assert "kernel interface 1," in _native._registration_error.__wrapped__()


def test_layer_and_group_norm_never_reach_the_batch_norm_kernel():
    """A layer norm of one feature is shaped like a batch norm of 4 rows: the seam's kind, not
    the shapes, decides (this call once crashed in the kernel's reshape)."""
    x = jnp.arange(4.0, dtype=jnp.float32).reshape(4, 1)
    y = jaxbn.layer_norm(x, jnp.ones(1), jnp.full(1, 2.0))
    np.testing.assert_array_equal(y, np.full((4, 1), 2.0, np.float32))
    assert "jaxbn_batch_norm" not in str(jax.make_jaxpr(
        lambda x: jaxbn.layer_norm(x, jnp.ones(1), jnp.zeros(1)))(x))
    images = rand(0, (2, 4, 3, 3), jnp.float32)
    for groups in (1, 4):  # layer norm over (C, H, W) and instance norm
        assert "jaxbn_batch_norm" not in str(jax.make_jaxpr(
            lambda x: jaxbn.group_norm(x, jnp.ones(4), jnp.zeros(4), groups=groups))(images))


@pytest.mark.parametrize("forward_native", [True, False])
def test_the_backward_runs_where_the_forward_decided(forward_native):
    """The native decision is made once per call: switching JAXBN_NATIVE between the forward
    and the backward changes nothing about the backward."""
    x, gamma, beta = _inputs((32, 4), -1, jnp.float32)
    f = lambda x, g, b: _bn(-1)(x, g, b)[0]
    os.environ[_native.ENV] = "1" if forward_native else "0"
    try:
        _, pullback = jax.vjp(f, x, gamma, beta)
        os.environ[_native.ENV] = "0" if forward_native else "1"
        backward_jaxpr = str(jax.make_jaxpr(pullback)(x))
    finally:
        del os.environ[_native.ENV]
    assert ("jaxbn_batch_norm_backward" in backward_jaxpr) == forward_native


def _script(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _clean_env() -> dict[str, str]:
    """The environment for a fresh JAX process: its own device count, the kernels on."""
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _native.ENV)}


def test_sharded_inputs_run_the_kernels_per_shard_without_a_gather():
    """8 simulated devices (tests/sharded_native_check.py): batch_norm and spatial_batch_norm
    NCHW/NHWC with jax.grad, auto and explicit mesh axes, batch, spatial and channel splits:
    no all-gather, y and dx keep x's sharding, values equal the one-device call."""
    proc = subprocess.run([sys.executable, _script("sharded_native_check.py")],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "sharded native checks passed" in proc.stdout


def test_a_batch_split_across_two_processes():
    """2 processes x 2 devices on 127.0.0.1 (tests/multiprocess_native_check.py), bounded by a
    timeout: each process's shards of y and dx and the replicated gradients equal float64."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, _script("multiprocess_native_check.py"), str(i),
                               str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=_clean_env()) for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            proc.kill()
    for i, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, out[-3000:]
        assert f"process {i}: multi-process native checks passed" in out


# (dtype, case): every vector path of the epilogue (features last; inner size > 1; the 16-wide
# half-precision loops, with and without a channel tail) once.
FUSED = [(F32, CASES[0]), (F64, CASES[0]), (F32, CASES[2]), (BF16, CASES[1]), (BF16, CASES[2]),
         (BF16, CASES[5])]


@pytest.mark.parametrize("with_residual", [True, False], ids=["add-relu", "relu"])
@pytest.mark.parametrize("dtype, case", FUSED,
                         ids=[f"{jnp.dtype(d).name}-{c[0]}-{c[1]}" for d, c in FUSED])
def test_fused_native_matches_the_jnp_rule(dtype, case, with_residual):
    """The kernels' ReLU (+ residual) epilogue and masked backward against the jnp rules."""
    shape, layout = case
    x, gamma, beta = _inputs(shape, layout, dtype, offset=0.5)
    if dtype == jnp.float64:
        gamma, beta = gamma.astype(dtype), beta.astype(dtype)
    residual = rand(4, shape, dtype, 0.5) if with_residual else None
    state = jaxbn.init_batch_norm_state(gamma.shape[0], gamma.dtype)
    kw = dict(train=True, activation="relu")

    def f(x, gamma, beta, r):
        if isinstance(layout, str):
            y, s = jaxbn.spatial_batch_norm(x, gamma, beta, state, layout=layout, residual=r, **kw)
        else:
            y, s = jaxbn.batch_norm(x, gamma, beta, state, axis=layout, residual=r, **kw)
        return y, (s.mean, s.var)
    args = (x, gamma, beta, residual)
    dy = rand(3, shape, dtype)
    jaxpr = str(jax.make_jaxpr(lambda *a: jax.vjp(f, *a, has_aux=True)[1](dy))(*args))
    assert "jaxbn_batch_norm_forward" in jaxpr and "jaxbn_batch_norm_backward" in jaxpr
    native, reference = _vjp(True, f, args, dy), _vjp(False, f, args, dy)
    assert np.mean(np.asarray(native[0], np.float64) == 0) > 0.1  # the ReLU clips something
    tol = {jnp.float64: 1e-12, jnp.float32: 2e-5, jnp.bfloat16: 2e-2}[dtype]
    for a, b in zip(jax.tree.leaves(native), jax.tree.leaves(reference)):
        assert a.dtype == b.dtype and a.shape == b.shape
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_allclose(a64, b64, rtol=tol, atol=tol * np.max(np.abs(b64)))


def test_fused_native_matches_finite_differences():
    x, gamma, beta = (a.astype(jnp.float64) for a in _inputs((40, 6), -1, jnp.float64, 0.5))
    r = rand(4, (40, 6), jnp.float64)
    state = jaxbn.init_batch_norm_state(6, jnp.float64)
    f = lambda x, g, b, r: jaxbn.batch_norm(x, g, b, state, train=True, residual=r,
                                            activation="relu")[0]
    assert "jaxbn_batch_norm_backward" in str(jax.make_jaxpr(
        lambda x: jax.vjp(lambda x: f(x, gamma, beta, r), x)[1](x))(x))
    testing.check_finite_differences(f, x, gamma, beta, r)


# (dtype, layout, one batch's shape, fused): each batch's x about 1 MiB, eight of them over 8 MiB,
# the size from which the kernels write their outputs with streaming stores; odd feature and inner
# sizes start rows and spans off the vectors' alignment. (float32 outputs stream where the build
# has AVX-512; float16's are two 16-byte stores each with AVX2 alone.)
STREAMED = [(F32, -1, (257, 1025), False), (BF16, -1, (257, 2049), True),
            (F32, "NCHW", (9, 29, 33, 31), True), (BF16, "NCHW", (9, 29, 63, 33), False),
            (F16, "NHWC", (9, 13, 21, 215), False)]


@pytest.mark.parametrize("dtype, layout, shape, fused", STREAMED,
                         ids=[f"{jnp.dtype(d).name}-{lay}-{'fused' if f else 'plain'}"
                              for d, lay, _, f in STREAMED])
def test_outputs_streamed_past_the_caches_keep_their_bits(dtype, layout, shape, fused):
    """Eight vmapped batches (one call, outputs of 8 MiB and more: streaming stores) against the
    first and the last alone (ordinary stores), bit for bit: y, dx and, fused, the residual's
    gradient."""
    _, gamma, beta = _inputs(shape, layout, dtype)
    normal = np.random.default_rng(0).standard_normal  # of this size, faster than compiling rand
    x, dy, r = (jnp.asarray(normal((8,) + shape, np.float32) * scale + offset).astype(dtype)
                for scale, offset in ((2.0, 3.0), (1.0, 0.0), (0.5, 0.0)))
    state = jaxbn.init_batch_norm_state(gamma.shape[0])

    def vjp(x, dy, r):
        def f(x, gamma, r):
            kw = dict(train=True, activation="relu", residual=r) if fused else dict(train=True)
            if isinstance(layout, str):
                return jaxbn.spatial_batch_norm(x, gamma, beta, state, layout=layout, **kw)[0]
            return jaxbn.batch_norm(x, gamma, beta, state, axis=layout, **kw)[0]
        y, pullback = jax.vjp(f, x, gamma, r)
        return y, pullback(dy)

    both, one = jax.jit(jax.vmap(vjp)), jax.jit(vjp)
    jaxpr = str(jax.make_jaxpr(both)(x, dy, r))  # one call for all eight batches each way
    assert jaxpr.count("jaxbn_batch_norm_forward") == jaxpr.count("jaxbn_batch_norm_backward") == 1
    together = jax.tree.leaves(both(x, dy, r))
    for i in range(8):
        alone = jax.tree.leaves(one(x[i], dy[i], r[i]))
        for a, b in zip(together, alone):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
