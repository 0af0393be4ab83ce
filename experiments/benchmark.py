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

Head to head (when both run): the native kernels and PyTorch again, in rounds of the two alone.
In the table's rounds seven other programs run between two calls of one candidate, and both find
their inputs in colder caches; alone, each follows the other. The two settings give different
ratios on the same machine; the summary reports both (``native_alone_vs_torch*``).

bfloat16, forward only (inference-style train-mode forward, no VJP): ``native``, ``alt`` and
PyTorch's ``F.batch_norm`` under ``torch.no_grad()``.

Sharded (``--sharded`` runs only this): forward + backward of ``batch_norm`` on x split along the
batch over 8 simulated CPU devices (a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``), against the same call on one device, for
the native kernels and the jnp rule. On this machine the 8 devices share its cores, so the time
per step shows whether the work is split (about the one-device time) or repeated on every device
(about 8x, what a gathered x costs).

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
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments import adapters
from experiments.timing import calm_openmp, interleaved_medians, interleaved_times, native_kernels
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


def _kernel_calls(compiled) -> int:
    """How many of jaxbn's native kernels the compiled program calls."""
    return compiled.as_text().count('custom_call_target="jaxbn_')


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


def _threads() -> int:
    """PyTorch gets as many threads as jaxbn's kernels (``JAXBN_NUM_THREADS``, default all)."""
    return int(os.environ.get("JAXBN_NUM_THREADS", os.cpu_count() or 1))


def _torch_fn(x, gamma, beta, dy):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(_threads())
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
    x = (jax.random.normal(kx, shape, jnp.float32) * 2 + 1).astype(dtype)
    dy = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
    lay = _layout(shape, layout)
    gamma = jax.random.normal(kg, lay.param_shape, jnp.float32) * 0.1 + 1
    beta = jnp.zeros(lay.param_shape, jnp.float32)
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
    head_to_head = None
    if {"native", "torch"} <= set(fns):  # the two alone: no other program between their calls
        head_to_head = interleaved_medians({k: fns[k] for k in ("native", "torch")},
                                           repeats=repeats, warmup=1)
    # 5 arrays at the bandwidth of a 2-array copy's best time; none where x fits in cache.
    bound = 2.5 * best["copy"] if x.nbytes >= MIN_BOUND_BYTES else None
    residual = {}
    for name, f in forwards.items():
        with native_kernels(name == "native"):
            residual[name] = _residual_bytes(f, x, gamma, beta)
    temp = {name: _temp_bytes(run) for name, run in runs.items()}
    return {"shape": list(shape), "layout": layout, "dtype": jnp.dtype(dtype).name,
            "x_bytes": int(x.nbytes), "seconds": seconds, "head_to_head": head_to_head,
            "bound_seconds": bound,
            "residual_bytes": residual, "temp_bytes": temp,
            "kernel_calls": {name: _kernel_calls(run) for name, run in runs.items()}}


def _torch_forward_fn(x, gamma, beta):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(_threads())
    dtype = torch.bfloat16 if x.dtype == jnp.bfloat16 else torch.float32
    tx = torch.from_numpy(np.array(x, np.float32)).to(dtype)
    tg, tb = (torch.from_numpy(np.array(a, np.float32)) for a in (gamma, beta))
    rm, rv = torch.zeros(gamma.shape[0]), torch.ones(gamma.shape[0])

    def run():
        with torch.no_grad():
            return torch.nn.functional.batch_norm(tx, rm, rv, tg, tb, training=True,
                                                  momentum=0.1, eps=1e-5)
    return run


def bench_forward(shape, layout, dtype, repeats) -> dict:
    """Forward only (train mode, no VJP): native, the jnp alt rule and PyTorch."""
    x = (jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2 + 1).astype(dtype)
    lay = _layout(shape, layout)
    gamma = jax.random.normal(jax.random.key(1), lay.param_shape, jnp.float32) * 0.1 + 1
    beta = jnp.zeros(lay.param_shape, jnp.float32)
    fns, kernel_calls = {}, {}
    for name, native in (("native", True), ("alt", False)):
        if native and not jaxbn.native_status()["enabled"]:
            continue
        # A function of its own for each: JAX caches a function's trace, and the switch is read
        # when it is traced, so a shared one would give "alt" the native program again.
        forward = _jaxbn_forward("alt", lay)
        with native_kernels(native):
            run = jax.jit(forward).lower(x, gamma, beta).compile()
        fns[name] = functools.partial(run, x, gamma, beta)
        kernel_calls[name] = _kernel_calls(run)
    torch_run = _torch_forward_fn(x, gamma, beta)
    if torch_run is not None:
        fns["torch"] = torch_run
    seconds, _ = _medians_and_best(fns, repeats)
    return {"shape": list(shape), "layout": layout, "dtype": jnp.dtype(dtype).name,
            "seconds": seconds, "kernel_calls": kernel_calls}


SHARDED_SHAPE, QUICK_SHARDED_SHAPE = (8192, 512), (512, 64)
SHARDED_DEVICES = 8


def sharded_worker(repeats: int, shape=SHARDED_SHAPE) -> dict:
    """Runs in a process with 8 devices: forward + backward of batch_norm on x split along the
    batch, against the same call on one device, native and jnp (see the module docstring)."""
    from jax.sharding import NamedSharding, PartitionSpec
    assert jax.device_count() == SHARDED_DEVICES, jax.device_count()
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2 + 1
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    lay = _layout(shape, "NC")
    gamma, beta = jnp.ones(lay.param_shape, jnp.float32), jnp.zeros(lay.param_shape, jnp.float32)
    mesh = jax.make_mesh((SHARDED_DEVICES,), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, PartitionSpec("data"))
    one = jax.devices()[0]
    inputs = {"1 device": [jax.device_put(a, one) for a in (x, gamma, beta, dy)],
              f"{SHARDED_DEVICES} devices": [jax.device_put(x, split), gamma, beta,
                                             jax.device_put(dy, split)]}
    fns, gathers = {}, {}
    for rule, native in (("native", True), ("alt", False)):
        for where, args in inputs.items():
            with native_kernels(native):
                run = _vjp_fn(_jaxbn_forward("alt", lay)).lower(*args).compile()
            fns[f"{rule}, {where}"] = functools.partial(run, *args)
            gathers[f"{rule}, {where}"] = run.as_text().count("all-gather")
    seconds, _ = _medians_and_best(fns, repeats)
    return {"shape": list(shape), "devices": SHARDED_DEVICES, "seconds": seconds,
            "all_gathers": gathers}


def bench_sharded(repeats: int, quick: bool = False) -> dict | None:
    """:func:`sharded_worker` in a fresh process (the device count is fixed when JAX starts)."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={SHARDED_DEVICES}")
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--sharded-worker",
                           "--repeats", str(repeats)] + (["--quick"] if quick else []),
                          capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        print(f"sharded benchmark failed:\n{proc.stderr[-2000:]}")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


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
    x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    dy = jax.random.normal(jax.random.key(2), shape, jnp.float32)
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
    out.update(_summarize_head_to_head(bn_rows))
    return out


def _summarize_head_to_head(bn_rows) -> dict:
    """PyTorch's time over the native kernels' in rounds of the two alone: the float32 geomean,
    the worst float32 shape, and each other dtype's rows."""
    if not bn_rows or any(r.get("head_to_head") is None for r in bn_rows):
        return {}
    def ratio(r):
        return r["head_to_head"]["torch"] / r["head_to_head"]["native"]

    f32 = [ratio(r) for r in bn_rows if r["dtype"] == "float32"]
    out = {"native_alone_vs_torch": _geomean(f32), "native_alone_worst_shape_vs_torch": min(f32)}
    out.update({f"native_alone_vs_torch_{r['dtype']}_{'x'.join(map(str, r['shape']))}": ratio(r)
                for r in bn_rows if r["dtype"] != "float32"})
    return out


def summarize_forward(rows) -> dict:
    """PyTorch's time over jaxbn's (native, else alt) for each forward-only row."""
    out = {}
    for r in rows:
        lead = "native" if "native" in r["seconds"] else "alt"
        if "torch" in r["seconds"]:
            out[f"{lead}_forward_vs_torch_{r['dtype']}_{'x'.join(map(str, r['shape']))}"] = (
                r["seconds"]["torch"] / r["seconds"][lead])
    return out


def print_forward_and_sharded(result) -> None:
    print("\nforward only, train mode: median ms")
    for r in result.get("forward", []):
        cells = ", ".join(f"{k} {v * 1e3:.3f}" for k, v in r["seconds"].items())
        print(f"  {'x'.join(map(str, r['shape']))} {r['dtype']}: {cells}")
    sharded = result.get("sharded")
    if sharded:
        print(f"\nbatch_norm forward + backward, {'x'.join(map(str, sharded['shape']))} float32 "
              f"split along the batch over {sharded['devices']} simulated devices (one machine's "
              f"cores): median ms per step (all-gathers in the compiled step)")
        for k, v in sharded["seconds"].items():
            print(f"  {k:>20}: {v * 1e3:8.3f}  ({sharded['all_gathers'][k]} all-gathers)")


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
    pairs = [r for r in result["batch_norm"] if r.get("head_to_head")]
    if pairs:
        print("\nnative and torch alone (rounds of the two only), median ms: " + "; ".join(
            f"{'x'.join(map(str, r['shape']))} {r['dtype']} {r['head_to_head']['native'] * 1e3:.3f}"
            f" / {r['head_to_head']['torch'] * 1e3:.3f}" for r in pairs))
    print("\nsummary (geometric means over the float32 shapes):")
    for k, v in result["summary"].items():
        print(f"  {k}: {v:.3f}" if v is not None else f"  {k}: n/a")
    print("\ndropout (rate 0.5), forward + backward: median ms, residual bytes per element")
    for r in result["dropout"]:
        n_elem = r["x_bytes"] / 4
        per_element = {k: b / n_elem for k, b in r["residual_bytes"].items()}
        cells = ", ".join(f"{k} {v * 1e3:.3f} ms ({per_element[k]:.3f} B/el)"
                          if k in per_element else f"{k} {v * 1e3:.3f} ms"
                          for k, v in r["seconds"].items())
        print(f"  {'x'.join(map(str, r['shape']))}: {cells}")
    print_forward_and_sharded(result)
    adapters.print_table(result["adapters"])
    if result["missing"]:
        print(f"\nnot measured (not installed; pip install -e '.[bench]'): "
              f"{', '.join(result['missing'])}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sharded", action="store_true",
                        help="only the sharded row (8 simulated devices, in a subprocess)")
    parser.add_argument("--sharded-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torch-default-spin", action="store_true",
                        help="leave PyTorch's OpenMP workers spinning 300000 iterations after "
                             "each call (its default) instead of 30000")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 25)
    if args.sharded_worker:  # the subprocess of bench_sharded: one JSON line on stdout
        print(json.dumps(sharded_worker(repeats, QUICK_SHARDED_SHAPE if args.quick
                                        else SHARDED_SHAPE)))
        return {}
    if args.sharded:
        result = {"sharded": bench_sharded(repeats, args.quick)}
        print_forward_and_sharded(result)
        return result
    torch_openmp = calm_openmp(args.torch_default_spin)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    bn_rows = [bench_batch_norm(s, layout, jnp.float32, repeats) for s, layout in shapes]
    if not args.quick:
        bn_rows += [bench_batch_norm(s, layout, jnp.bfloat16, repeats) for s, layout in BF16_SHAPES]
    forward_rows = [bench_forward(s, layout, jnp.bfloat16, repeats) for s, layout in
                    ([QUICK_SHAPES[0]] if args.quick else BF16_SHAPES)]
    sharded = bench_sharded(repeats, args.quick)
    dropout_rows = [bench_dropout(s, repeats) for s in
                    ([(256, 256)] if args.quick else DROPOUT_SHAPES)]
    adapter_rows = adapters.bench_adapters(repeats, (8, 8, 8, 16) if args.quick
                                           else adapters.LAYER_SHAPE)
    missing = [m for m in ("flax", "torch") if m not in bn_rows[0]["seconds"]]
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), "
                         f"{jax.default_backend()} ({jax.devices()[0].device_kind})",
              "command": "python -m experiments.benchmark" + (" --quick" if args.quick else ""),
              "jax": jax.__version__, "torch_openmp": torch_openmp, "batch_norm": bn_rows,
              "dropout": dropout_rows,
              "adapters": adapter_rows, "forward": forward_rows, "sharded": sharded,
              "summary": {**summarize(bn_rows), **summarize_forward(forward_rows)},
              "missing": missing}
    print_tables(result)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "benchmark.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nwrote {path}")
    return result


if __name__ == "__main__":
    main()
