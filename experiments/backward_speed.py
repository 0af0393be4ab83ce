"""How fast are the two hand-derived batch norm backwards, and autodiff, under XLA?

The cs231n write-ups report the simplified ("alt") backward about 2x faster than the staged
("graph") one in numpy. This study times, for each shape, jitted forward + backward of jaxbn's
``"graph"``, ``"alt"`` and ``"autodiff"`` (float32, train mode) and numpy forward + backward of both
derivations as a reference, as medians of interleaved repetitions.
"""

from __future__ import annotations

import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments.timing import interleaved_medians, native_kernels

SHAPES = [(100, 500), (1000, 500), (4096, 1024), (16384, 1024)]
QUICK_SHAPES = [(100, 500), (1000, 500)]


def numpy_forward(x, gamma, beta, eps=1e-5):
    mu = x.mean(0)
    xmu = x - mu
    var = (xmu ** 2).mean(0)
    sqrtvar = np.sqrt(var + eps)
    ivar = 1.0 / sqrtvar
    x_hat = xmu * ivar
    return gamma * x_hat + beta, (x_hat, xmu, ivar, sqrtvar, gamma)


def numpy_backward_graph(dout, cache):
    """The staged backward, node by node (numpy reference)."""
    x_hat, xmu, ivar, sqrtvar, gamma = cache
    m = dout.shape[0]
    dbeta = dout.sum(0)
    dgamma = (dout * x_hat).sum(0)
    dx_hat = dout * gamma
    divar = (dx_hat * xmu).sum(0)
    dxmu1 = dx_hat * ivar
    dsqrtvar = -divar / sqrtvar ** 2
    dvar = 0.5 * dsqrtvar / sqrtvar
    dsq = np.ones_like(dout) * dvar / m
    dxmu2 = 2 * xmu * dsq
    dx1 = dxmu1 + dxmu2
    dmu = -dx1.sum(0)
    dx = dx1 + np.ones_like(dout) * dmu / m
    return dx, dgamma, dbeta


def numpy_backward_alt(dout, cache):
    """The simplified closed form (numpy reference)."""
    x_hat, _, ivar, _, gamma = cache
    m = dout.shape[0]
    dbeta = dout.sum(0)
    dgamma = (dout * x_hat).sum(0)
    dx = (gamma * ivar / m) * (m * dout - dbeta - x_hat * dgamma)
    return dx, dgamma, dbeta


def _jax_step(backward):
    state = None

    @jax.jit
    def step(x, gamma, beta, dy):
        fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, backward=backward)[0]
        _, pullback = jax.vjp(fn, x, gamma, beta)
        return pullback(dy)

    def bind(x, gamma, beta, dy):
        nonlocal state
        state = jaxbn.init_batch_norm_state(x.shape[1])
        # The derivations compared as jnp code: without the native kernels (which run "alt").
        with native_kernels(False):
            compiled = step.lower(x, gamma, beta, dy).compile()
        return lambda: compiled(x, gamma, beta, dy)

    return bind


def run(quick: bool = False, seed: int = 0) -> dict[str, Any]:
    shapes = QUICK_SHAPES if quick else SHAPES
    rng = np.random.default_rng(seed)
    rows = []
    for n, d in shapes:
        x = rng.normal(size=(n, d)).astype(np.float32) * 2 + 1
        gamma = rng.normal(size=d).astype(np.float32)
        beta = rng.normal(size=d).astype(np.float32)
        dy = rng.normal(size=(n, d)).astype(np.float32)
        jx, jg, jb, jdy = map(jnp.asarray, (x, gamma, beta, dy))
        fns = {f"jax_{b}": _jax_step(b)(jx, jg, jb, jdy) for b in ("graph", "alt", "autodiff")}
        fns["numpy_graph"] = lambda: numpy_backward_graph(dy, numpy_forward(x, gamma, beta)[1])
        fns["numpy_alt"] = lambda: numpy_backward_alt(dy, numpy_forward(x, gamma, beta)[1])
        size = n * d
        repeats = 5 if quick else (30 if size <= 1e6 else 10)
        medians = interleaved_medians(fns, repeats=repeats, warmup=2)
        rows.append({"shape": [n, d], "seconds": medians})
    return {"config": {"shapes": [list(s) for s in shapes], "dtype": "float32",
                       "what": "forward + backward, train mode, jitted (numpy: eager)",
                       "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{jax.device_count()} {jax.default_backend()} device(s)"},
            "rows": rows}
