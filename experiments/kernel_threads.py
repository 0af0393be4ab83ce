"""When the native kernels start threads: tiny, vmapped and mid-sized batch norms (fused ReLU,
forward + backward), median microseconds over interleaved rounds, each with the default thread
count and with ``JAXBN_NUM_THREADS=1`` (the control: the same call on the calling thread).

``python -m experiments.kernel_threads [--repeats N] [--big]``: ``--big`` times 256K-4M-value
problems instead of the small ones. Numbers: experiments/README.md (issue 25).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

import jaxbn
from experiments.timing import interleaved_medians

# name: (vmapped batch or None, the shape of one batch norm's x)
SMALL = {"(8,3)": (None, (8, 3)), "vmap 1000 x (8,3)": (1000, (8, 3)),
         "vmap 64 x (32,16)": (64, (32, 16)), "(256,64)": (None, (256, 64))}
BIG = {"(1024,256)": (None, (1024, 256)), "(2048,256)": (None, (2048, 256)),
       "(4096,256)": (None, (4096, 256)), "(4096,1024)": (None, (4096, 1024))}


def _with_threads(n, fn):
    """``fn`` run with ``JAXBN_NUM_THREADS=n`` (None: unset); the kernels read it per call."""
    def run():
        old = os.environ.pop("JAXBN_NUM_THREADS", None)
        if n is not None:
            os.environ["JAXBN_NUM_THREADS"] = str(n)
        try:
            return jax.block_until_ready(fn())
        finally:
            os.environ.pop("JAXBN_NUM_THREADS", None)
            if old is not None:
                os.environ["JAXBN_NUM_THREADS"] = old
    return run


def _step(batch, shape):
    full = shape if batch is None else (batch,) + shape
    x = jax.random.normal(jax.random.key(0), full)
    dy = jax.random.normal(jax.random.key(1), full)
    d = shape[-1]
    state, gamma, beta = jaxbn.init_batch_norm_state(d), jnp.ones(d), jnp.zeros(d)
    f = lambda x: jaxbn.batch_norm(x, gamma, beta, state, train=True, activation="relu")[0]
    f = f if batch is None else jax.vmap(f)
    run = jax.jit(lambda x, dy: jax.vjp(f, x)[1](dy))
    assert "jaxbn_batch_norm_backward" in run.lower(x, dy).as_text()
    return lambda: run(x, dy)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(prog="python -m experiments.kernel_threads",
                                     description=__doc__)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--big", action="store_true")
    args = parser.parse_args(argv)
    fns = {}
    for name, (batch, shape) in (BIG if args.big else SMALL).items():
        call = _step(batch, shape)
        fns[f"{name} default"] = _with_threads(None, call)
        fns[f"{name} 1 thread"] = _with_threads(1, call)
    medians = interleaved_medians(fns, repeats=args.repeats, warmup=3)
    print(f"load average {os.getloadavg()}")
    for name, sec in medians.items():
        print(f"{name:<28} {sec * 1e6:10.1f} us")
    return medians


if __name__ == "__main__":
    main()
