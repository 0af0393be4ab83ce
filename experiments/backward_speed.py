"""How fast are the two hand-derived batch norm backwards, and autodiff, under XLA?

The cs231n write-ups report the simplified ("alt") backward about 2x faster than the staged
("graph") one in numpy. This study times, for each shape, jitted forward + backward of jaxbn's
``"graph"``, ``"alt"`` and ``"autodiff"`` (float32, train mode) and numpy forward + backward of both
derivations as a reference, as medians of interleaved repetitions, once per seed (the seed draws
the data; each seed's rounds are a separate measurement).
"""

from __future__ import annotations

import functools
import platform
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments.timing import interleaved_times, native_kernels

SHAPES = [(100, 500), (1000, 500), (4096, 1024)]
# The ratios the findings compare, each per interleaved round.
RATIOS = [("numpy_graph", "numpy_alt"), ("jax_graph", "jax_alt"), ("jax_autodiff", "jax_alt")]
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


def _jax_step(backward, x, gamma, beta, dy):
    """Jitted forward + backward of jaxbn's ``backward`` rule, compiled for these shapes."""
    state = jaxbn.init_batch_norm_state(x.shape[1])

    @jax.jit
    def step(x, gamma, beta, dy):
        fn = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, backward=backward)[0]
        _, pullback = jax.vjp(fn, x, gamma, beta)
        return pullback(dy)

    # The derivations compared as jnp code: without the native kernels (which run "alt").
    with native_kernels(False):
        return step.lower(x, gamma, beta, dy).compile()


def _numpy_step(backward, x, gamma, beta, dy):
    return backward(dy, numpy_forward(x, gamma, beta)[1])


def _arrays(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32) * 2 + 1
    gamma = rng.normal(size=d).astype(np.float32)
    beta = rng.normal(size=d).astype(np.float32)
    return x, gamma, beta, rng.normal(size=(n, d)).astype(np.float32)


def run(quick: bool = False, seeds: list[int] = (0, 1, 2)) -> dict[str, Any]:
    """Per shape and seed (the seed draws the data; each seed is its own block of interleaved
    rounds, so the spread over seeds is the spread between separate measurements)."""
    shapes = QUICK_SHAPES if quick else SHAPES
    rows = []
    for n, d in shapes:
        probe = [jnp.asarray(a) for a in _arrays(np.random.default_rng(seeds[0]), n, d)]
        compiled = {f"jax_{b}": _jax_step(b, *probe) for b in ("graph", "alt", "autodiff")}
        repeats = 4 if quick else (8 if n * d <= 1e6 else 4)
        per_seed, ratios = [], {pair: [] for pair in RATIOS}
        for seed in seeds:
            x, gamma, beta, dy = _arrays(np.random.default_rng(seed), n, d)
            args = [jnp.asarray(a) for a in (x, gamma, beta, dy)]
            fns = {name: functools.partial(c, *args) for name, c in compiled.items()}
            for name, backward in (("numpy_graph", numpy_backward_graph),
                                   ("numpy_alt", numpy_backward_alt)):
                fns[name] = functools.partial(_numpy_step, backward, x, gamma, beta, dy)
            times = {k: np.asarray(v) for k, v in
                     interleaved_times(fns, repeats=repeats, warmup=1).items()}
            per_seed.append({k: float(np.median(v)) for k, v in times.items()})
            # Round by round, the two candidates ran side by side: the median of those ratios.
            for (a, b) in RATIOS:
                ratios[(a, b)].append(float(np.median(times[a] / times[b])))
        rows.append({"shape": [n, d],
                     "seconds": {name: [m[name] for m in per_seed] for name in per_seed[0]},
                     "ratios": {f"{a}/{b}": r for (a, b), r in ratios.items()}})
    return {"config": {"shapes": [list(s) for s in shapes], "dtype": "float32",
                       "what": "forward + backward, train mode, jitted (numpy: eager)",
                       "machine": f"{platform.processor() or platform.machine()}, "
                                  f"{jax.device_count()} {jax.default_backend()} device(s)"},
            "seeds": list(seeds), "rows": rows}
