"""Benchmark: batch norm and dropout, forward + backward, against peers and the bandwidth bound.

``python -m experiments.benchmark [--quick] [--out DIR] [--repeats N]`` prints a table and writes
``benchmark.json``. Everything is timed side by side in one process: each round runs every
candidate once in turn (interleaved), and medians are reported.

Batch norm (train mode, forward + backward with a cotangent, float32 unless noted):

- ``native``: jaxbn's default on the CPU, the C++ kernels behind the ``"alt"`` rule (when built);
- ``alt``, ``graph``, ``autodiff``: jaxbn's three backward choices as jnp code (compiled with
  ``JAXBN_NATIVE=0``), jitted;
- ``naive``: ``jax.vjp`` of a textbook forward (``jnp.mean``/``jnp.var``), jitted;
- ``flax``: ``flax.linen.BatchNorm`` (when installed), jitted;
- ``torch``: ``torch.nn.functional.batch_norm`` forward + ``backward`` on the CPU (when installed);
- ``bound``: the time to stream 5 arrays of x's size (read x, write y, read dy, read x again, write
  dx) at the copy bandwidth measured in the same run: the *best* time of a jitted ``x + 1`` (one
  read, one write), since the bandwidth is what the machine can do and the median is noisy.
  ``bound/ours`` is the fraction of that bound jaxbn's default (native, else alt) reaches. Shapes
  whose x fits in the last-level cache (under 8 MiB) are not bandwidth-bound: no bound is shown.

Memory: the residual bytes the VJP keeps between forward and backward (the arrays in the closure
``jax.vjp`` returns) and XLA's compiled temporary size of forward + backward.

The framework adapters (:mod:`experiments.adapters`): one batch norm layer of Flax NNX, Flax Linen
and Equinox against jaxbn's drop-in layer, residual bytes and time.

Dropout (rate 0.5): jaxbn's ``dropout`` (bit-packed mask residual, 1 bit per element), the
alternative that regenerates the mask from the key in the backward (no residual), ``bernoulli`` +
``where`` differentiated by JAX, and PyTorch's ``F.dropout``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments import adapters
from experiments.timing import interleaved_times, native_kernels
from jaxbn import reference
from jaxbn._layout import layout as layout_of

SHAPES = [((4096, 1024), "NC"), ((65536, 64), "NC"), ((512, 8192), "NC"),
          ((64, 64, 32, 32), "NCHW")]
BF16_SHAPES = [((4096, 1024), "NC"), ((64, 64, 32, 32), "NCHW")]
QUICK_SHAPES = [((512, 256), "NC"), ((16, 8, 8, 8), "NCHW")]
DROPOUT_SHAPES = [(4096, 1024), (64, 64, 32, 32)]
# Below this many bytes x fits in a typical last-level cache: the run is not bandwidth-bound and
# a "bound" computed from a copy would not be one.
MIN_BOUND_BYTES = 8 * 2**20


def _layout(shape, layout):
    """The seam's view of batch norm on this shape: "NC" is features-last (N, D)."""
    return layout_of(shape, "batch", axis=len(shape) - 1,
                     image_layout=None if layout == "NC" else layout)


def _medians_and_best(fns, repeats):
    times = interleaved_times(fns, repeats=repeats, warmup=3)
    return ({k: statistics.median(v) for k, v in times.items()},
            {k: min(v) for k, v in times.items()})


def _vjp_fn(forward):
    """Jitted forward + backward of ``forward(x, gamma, beta)`` with cotangent ``dy``."""
    @jax.jit
    def run(x, gamma, beta, dy):
        y, pullback = jax.vjp(forward, x, gamma, beta)
        return y, pullback(dy)  # y too: else XLA drops the forward's output pass
    return run


def _residual_bytes(forward, x, gamma, beta) -> int:
    _, pullback = jax.vjp(forward, x, gamma, beta)
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes")))


def _temp_bytes(compiled) -> int | None:
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend reports it
        return None


def _compiled(native: bool, run, *args):
    """``run`` (jitted) compiled for ``args`` with the native kernels on or off."""
    with native_kernels(native):
        return run.lower(*args).compile()


def _jaxbn_forward(backward, lay):
    state = jaxbn.init_batch_norm_state(lay.param_shape[0])
    return lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True, axis=lay.feature_axis,
                                            backward=backward)[0]


def _naive_forward(lay):
    def forward(x, gamma, beta):
        xf = x.astype(jnp.float32)
        mean = xf.mean(lay.stat_axes, keepdims=True)
        y = (xf - mean) / jnp.sqrt(xf.var(lay.stat_axes, keepdims=True) + 1e-5)
        return (y * gamma.reshape(lay.param_view) + beta.reshape(lay.param_view)).astype(x.dtype)
    return forward


def _flax_forward(axis):
    try:
        import flax.linen as nn
    except ImportError:
        return None
    def forward(x, gamma, beta):
        module = nn.BatchNorm(use_running_average=False, axis=axis, momentum=0.9, epsilon=1e-5,
                              dtype=x.dtype)
        variables = {"params": {"scale": gamma, "bias": beta},
                     "batch_stats": {"mean": jnp.zeros_like(gamma), "var": jnp.ones_like(gamma)}}
        y, _ = module.apply(variables, x, mutable=["batch_stats"])
        return y
    return forward


def _torch_fn(x, gamma, beta, dy):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    tx = torch.from_numpy(np.array(x, np.float32)).to(dtype).requires_grad_(True)
    tg = torch.from_numpy(np.array(gamma, np.float32)).requires_grad_(True)
    tb = torch.from_numpy(np.array(beta, np.float32)).requires_grad_(True)
    tdy = torch.from_numpy(np.array(dy, np.float32)).to(dtype)
    rm, rv = torch.zeros(gamma.shape[0]), torch.ones(gamma.shape[0])

    def run():
        y = torch.nn.functional.batch_norm(tx, rm, rv, tg, tb, training=True, momentum=0.1,
                                           eps=1e-5)
        return torch.autograd.grad(y, (tx, tg, tb), tdy)
    return run


def bench_batch_norm(shape, layout, dtype, repeats) -> dict:
    key = jax.random.key(0)
    kx, kd, kg = jax.random.split(key, 3)
    x = (jax.random.normal(kx, shape) * 2 + 1).astype(dtype)
    dy = jax.random.normal(kd, shape).astype(dtype)
    lay = _layout(shape, layout)
    gamma = jax.random.normal(kg, lay.param_shape) * 0.1 + 1
    beta = jnp.zeros(lay.param_shape)
    forwards = {b: _jaxbn_forward(b, lay) for b in ("alt", "graph", "autodiff")}
    with native_kernels(True):
        if jaxbn.native_status()["enabled"]:  # built, and accepted by this jaxlib
            forwards["native"] = _jaxbn_forward("alt", lay)
    forwards["naive"] = _naive_forward(lay)
    flax_forward = _flax_forward(lay.feature_axis)
    if flax_forward is not None:
        forwards["flax"] = flax_forward
    runs = {name: _compiled(name == "native", _vjp_fn(f), x, gamma, beta, dy)
            for name, f in forwards.items()}
    fns = {name: functools.partial(run, x, gamma, beta, dy) for name, run in runs.items()}
    torch_run = _torch_fn(x, gamma, beta, dy)
    if torch_run is not None:
        fns["torch"] = torch_run
    copy = jax.jit(lambda a: a + 1)
    fns["copy"] = functools.partial(copy, x)
    seconds, best = _medians_and_best(fns, repeats)
    seconds.pop("copy")
    # 5 arrays at the bandwidth of a 2-array copy's best time; none where x fits in cache.
    bound = 2.5 * best["copy"] if x.nbytes >= MIN_BOUND_BYTES else None
    residual = {}
    for name, f in forwards.items():
        with native_kernels(name == "native"):
            residual[name] = _residual_bytes(f, x, gamma, beta)
    temp = {name: _temp_bytes(run) for name, run in runs.items()}
    return {"shape": list(shape), "layout": layout, "dtype": jnp.dtype(dtype).name,
            "x_bytes": int(x.nbytes), "seconds": seconds, "bound_seconds": bound,
            "residual_bytes": residual, "temp_bytes": temp}


def _dropout_regenerate_forward(key, rate):
    """The alternative design, for comparison: no residual, the mask regenerated from the key."""
    scale = 1.0 / (1.0 - rate)
    keep = lambda shape: jax.random.bernoulli(key, 1.0 - rate, shape)

    @jax.custom_vjp
    def f(x):
        return jnp.where(keep(x.shape), x * scale, 0).astype(x.dtype)

    f.defvjp(lambda x: (f(x), None),
             lambda _, dy: (jnp.where(keep(dy.shape), dy * scale, 0).astype(dy.dtype),))
    return f


def bench_dropout(shape, repeats) -> dict:
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(jax.random.key(2), shape)
    key = jax.random.key(3)
    forwards = {
        "jaxbn (packed mask)": lambda x: jaxbn.dropout(key, x, rate=0.5, train=True),
        "regenerate from key": _dropout_regenerate_forward(key, 0.5),
        "bernoulli+where": lambda x: reference.dropout(key, x, rate=0.5),
    }

    def vjp_run(f):
        @jax.jit
        def run(x, dy):
            y, pullback = jax.vjp(f, x)
            return y, pullback(dy)
        return run

    fns = {name: functools.partial(vjp_run(f), x, dy) for name, f in forwards.items()}
    try:
        import torch
        tx = torch.from_numpy(np.array(x)).requires_grad_(True)
        tdy = torch.from_numpy(np.array(dy))
        fns["torch"] = lambda: torch.autograd.grad(
            torch.nn.functional.dropout(tx, 0.5, training=True), tx, tdy)
    except ImportError:
        pass
    seconds, _ = _medians_and_best(fns, repeats)
    residual = {}
    for name, f in forwards.items():
        _, pullback = jax.vjp(f, x)
        residual[name] = int(sum(leaf.nbytes for leaf in jax.tree.leaves(pullback)
                                 if hasattr(leaf, "nbytes")))
    return {"shape": list(shape), "x_bytes": int(x.nbytes), "seconds": seconds,
            "residual_bytes": residual}


def _geomean(values):
    values = [v for v in values if v is not None and v > 0]
    return float(np.exp(np.mean(np.log(values)))) if values else None


def _lead(row) -> str:
    """The rule jaxbn runs by default: the native kernels where built, else the jnp "alt"."""
    return "native" if "native" in row["seconds"] else "alt"


def summarize(bn_rows) -> dict:
    """Geometric means over the float32 shapes: speedups of the native kernels and of the jnp
    "alt" rule over each peer, their fractions of the bound, and the worst shape vs PyTorch."""
    f32 = [r for r in bn_rows if r["dtype"] == "float32"]
    out = {}
    for rule in ("native", "alt"):
        if not all(rule in r["seconds"] for r in f32):
            continue
        for peer in ("alt", "naive", "autodiff", "graph", "flax", "torch"):
            if peer != rule and all(peer in r["seconds"] for r in f32):
                out[f"{rule}_speedup_vs_{peer}"] = _geomean(
                    [r["seconds"][peer] / r["seconds"][rule] for r in f32])
        bounded = [r for r in f32 if r["bound_seconds"] is not None]
        out[f"{rule}_fraction_of_bound"] = (_geomean(
            [r["bound_seconds"] / r["seconds"][rule] for r in bounded]) if bounded else None)
        out[f"{rule}_residual_over_input"] = max(r["residual_bytes"][rule] / r["x_bytes"]
                                                 for r in bn_rows)
        if all("torch" in r["seconds"] for r in bn_rows):
            out[f"{rule}_worst_shape_vs_torch"] = min(r["seconds"]["torch"] / r["seconds"][rule]
                                                      for r in f32)
            for r in bn_rows:
                if r["dtype"] != "float32":
                    name = f"{rule}_vs_torch_{r['dtype']}_{'x'.join(map(str, r['shape']))}"
                    out[name] = r["seconds"]["torch"] / r["seconds"][rule]
    return out


def print_tables(result) -> None:
    names = ["native", "alt", "graph", "autodiff", "naive", "flax", "torch"]
    print(f"\nbatch norm, forward + backward, train mode: median ms "
          f"({result['machine']}, {result['date']}); native = jaxbn's default on the CPU (C++ "
          f"kernels), alt = its jnp rule")
    header = f"{'shape':>20} {'dtype':>8} " + " ".join(f"{n:>9}" for n in names) + \
        f" {'bound':>9} {'bound/ours':>10} {'res/x':>6} {'temp MB':>8}"
    print(header)
    for r in result["batch_norm"]:
        s, lead = r["seconds"], _lead(r)
        cells = " ".join(f"{s[n] * 1e3:9.3f}" if n in s else f"{'-':>9}" for n in names)
        temp = r["temp_bytes"][lead]
        bound = r["bound_seconds"]
        bound_cells = (f"{bound * 1e3:9.3f} {bound / s[lead]:10.2f}" if bound is not None
                       else f"{'in cache':>9} {'-':>10}")
        print(f"{'x'.join(map(str, r['shape'])):>20} {r['dtype']:>8} {cells} {bound_cells} "
              f"{r['residual_bytes'][lead] / r['x_bytes']:6.3f} "
              f"{'-' if temp is None else f'{temp / 2**20:8.1f}':>8}")
    print("\nsummary (geometric means over the float32 shapes):")
    for k, v in result["summary"].items():
        print(f"  {k}: {v:.3f}" if v is not None else f"  {k}: n/a")
    print("\ndropout (rate 0.5), forward + backward: median ms, residual bytes per element")
    for r in result["dropout"]:
        n_elem = r["x_bytes"] / 4
        cells = ", ".join(f"{k} {v * 1e3:.3f} ms "
                          f"({r['residual_bytes'].get(k, 0) / n_elem:.3f} B/el)"
                          if k in r["residual_bytes"] else f"{k} {v * 1e3:.3f} ms"
                          for k, v in r["seconds"].items())
        print(f"  {'x'.join(map(str, r['shape']))}: {cells}")
    adapters.print_table(result["adapters"])
    if result["missing"]:
        print(f"\nnot measured (not installed; pip install -e '.[bench]'): "
              f"{', '.join(result['missing'])}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 25)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    bn_rows = [bench_batch_norm(s, layout, jnp.float32, repeats) for s, layout in shapes]
    if not args.quick:
        bn_rows += [bench_batch_norm(s, layout, jnp.bfloat16, repeats) for s, layout in BF16_SHAPES]
    dropout_rows = [bench_dropout(s, repeats) for s in
                    ([(256, 256)] if args.quick else DROPOUT_SHAPES)]
    adapter_rows = adapters.bench_adapters(repeats, (8, 8, 8, 16) if args.quick
                                           else adapters.LAYER_SHAPE)
    missing = [m for m in ("flax", "torch") if m not in bn_rows[0]["seconds"]]
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), "
                         f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              "command": "python -m experiments.benchmark" + (" --quick" if args.quick else ""),
              "jax": jax.__version__, "batch_norm": bn_rows, "dropout": dropout_rows,
              "adapters": adapter_rows,
              "summary": summarize(bn_rows), "missing": missing}
    print_tables(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "benchmark.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
