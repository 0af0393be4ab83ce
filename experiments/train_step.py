"""One jitted train step (forward, backward, SGD) of two small nets, with and without batch norm,
in jaxbn, Flax linen and PyTorch; and the passes the compiled step makes over its activations.

The nets (the issue's; ``quick=True`` gives the same structure at small sizes):

- MLP: ``4096 x 512 -> 1024 -> 1024 -> 10``, each hidden matmul followed by batch norm + ReLU;
- conv net, NHWC ``64 x 32 x 32 x 3``: three 3x3 convolutions (32, 64, 64 channels, stride 1,
  ``SAME``), each followed by batch norm + ReLU, then a global average pool and a dense layer
  to 10 classes.

Without normalization each hidden layer has a bias before its ReLU; with batch norm it has none
(beta is the bias). The loss is the softmax cross-entropy, the update plain SGD. What goes after
each hidden layer (``NORMS``): ``"none"`` (bias + ReLU), ``"jaxbn"`` (``jaxbn.batch_norm`` /
``spatial_batch_norm`` with ``activation="relu"``, the fused epilogue), ``"jaxbn-unfused"``
(jaxbn's batch norm, then ``jax.nn.relu``), ``"flax"`` (``flax.linen.BatchNorm``, then ReLU).
Whether jaxbn runs its native kernels is decided when the step is traced
(:func:`experiments.timing.native_kernels`).

:func:`count_passes` reads the compiled step: for every array the size of one of the nets'
activations, how many top-level operations (fusions, custom calls, dots, convolutions, copies)
read or write it.

``python -m experiments.train_step [--quick] [--repeats N] [--out DIR]`` times every variant of a
net in interleaved rounds (each round runs each step once, in turn; medians reported), prints a
table and writes ``train_step.json``: the step's time per variant, the batch-norm overhead per
framework (the step with batch norm minus the same framework's step without it), the passes, and
a dropout row (``4096 x 1024`` forward + backward, :func:`experiments.benchmark.bench_dropout`).
The variants: jaxbn fused and unfused, each with the native kernels and with the jnp rules; Flax
linen; PyTorch (CPU, its threads set to the machine's cores) with and without ``BatchNorm``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
from collections import Counter
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxbn
from experiments.timing import interleaved_times, native_kernels


class Net(NamedTuple):
    """A net's sizes: ``kind`` "mlp" (``dims`` = input, hidden..., classes) or "conv"
    (``dims`` = input channels, conv channels..., classes)."""

    kind: str
    batch: tuple[int, ...]  # x's shape: (N, D) or (N, H, W, C)
    dims: tuple[int, ...]

    @property
    def activation_sizes(self) -> tuple[int, ...]:
        """Element counts of the hidden activations (one per hidden layer)."""
        spatial = int(np.prod(self.batch[:-1]))
        return tuple(spatial * d for d in self.dims[1:-1])


MLP = Net("mlp", (4096, 512), (512, 1024, 1024, 10))
CONV = Net("conv", (64, 32, 32, 3), (3, 32, 64, 64, 10))
QUICK_MLP = Net("mlp", (256, 64), (64, 128, 128, 10))
QUICK_CONV = Net("conv", (8, 8, 8, 3), (3, 8, 16, 16, 10))
NORMS = ("none", "jaxbn", "jaxbn-unfused", "flax")
LEARNING_RATE = 0.01


def init(net: Net, key: jax.Array) -> dict[str, jax.Array]:
    """He-initialized weights ``w{i}``, zero biases ``b{i}``, ``gamma{i}`` ones, ``beta{i}``
    zeros, float32 (each step takes the entries it uses)."""
    params = {}
    keys = jax.random.split(key, len(net.dims) - 1)
    for i, (fan_in, fan_out) in enumerate(zip(net.dims[:-1], net.dims[1:])):
        conv = net.kind == "conv" and i < len(net.dims) - 2
        shape = (3, 3, fan_in, fan_out) if conv else (fan_in, fan_out)
        fan = fan_in * (9 if conv else 1)
        params[f"w{i}"] = jax.random.normal(keys[i], shape, jnp.float32) * float(np.sqrt(2.0 / fan))
        params[f"b{i}"] = jnp.zeros(fan_out, jnp.float32)
        params[f"gamma{i}"] = jnp.ones(fan_out, jnp.float32)
        params[f"beta{i}"] = jnp.zeros(fan_out, jnp.float32)
    return params


def init_state(net: Net) -> tuple[jaxbn.BatchNormState, ...]:
    return tuple(jaxbn.init_batch_norm_state(d) for d in net.dims[1:-1])


def _hidden(norm: str, h, params, i, state, spatial):
    """The layer after the i-th matmul or convolution: ``(activation, new_state)``."""
    if norm == "none":
        return jax.nn.relu(h + params[f"b{i}"]), state
    g, b = params[f"gamma{i}"], params[f"beta{i}"]
    if norm == "flax":
        import flax.linen as nn
        variables = {"params": {"scale": g, "bias": b},
                     "batch_stats": {"mean": state.mean, "var": state.var}}
        y, updates = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5).apply(
            variables, h, mutable=["batch_stats"])
        stats = updates["batch_stats"]
        return jax.nn.relu(y), jaxbn.BatchNormState(stats["mean"], stats["var"], state.count)
    kw: dict[str, Any] = dict(train=True)
    if spatial:
        kw["layout"] = "NHWC"
    bn = jaxbn.spatial_batch_norm if spatial else jaxbn.batch_norm
    if norm == "jaxbn":
        return bn(h, g, b, state, activation="relu", **kw)
    y, state = bn(h, g, b, state, **kw)
    return jax.nn.relu(y), state


def forward(net: Net, norm: str, params, states, x):
    """Logits and the new running statistics."""
    h, new = x, []
    for i in range(len(net.dims) - 2):
        if net.kind == "conv":
            h = jax.lax.conv_general_dilated(h, params[f"w{i}"], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        else:
            h = h @ params[f"w{i}"]
        h, state = _hidden(norm, h, params, i, states[i], net.kind == "conv")
        new.append(state)
    if net.kind == "conv":
        h = jnp.mean(h, axis=(1, 2))
    last = len(net.dims) - 2
    return h @ params[f"w{last}"] + params[f"b{last}"], tuple(new)


def make_step(net: Net, norm: str):
    """The jitted step ``(params, states, x, labels) -> (params, states, loss)``; ``params``
    as :func:`used_params` gives them."""

    def loss_fn(params, states, x, labels):
        logits, states = forward(net, norm, params, states, x)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1)), states

    @jax.jit
    def step(params, states, x, labels):
        (loss, states), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, states, x,
                                                                          labels)
        params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return params, states, loss
    return step


def used_params(net: Net, norm: str, key: jax.Array) -> dict[str, jax.Array]:
    """The parameters a variant uses: no bias before batch norm, no gamma/beta without it."""
    last = len(net.dims) - 2

    def used(name):
        kind, i = re.fullmatch(r"([a-z]+)(\d+)", name).groups()
        if kind == "w" or int(i) == last:
            return kind in ("w", "b")
        return kind == "b" if norm == "none" else kind in ("gamma", "beta")
    return {k: v for k, v in init(net, key).items() if used(k)}


def inputs(net: Net, key: jax.Array):
    kx, ky = jax.random.split(key)
    return (jax.random.normal(kx, net.batch, jnp.float32),
            jax.random.randint(ky, (net.batch[0],), 0, net.dims[-1], jnp.int32))


# ---------------------------------------------------------------------------------------------
# PyTorch: the same nets and step (CPU; NHWC as channels_last).


def torch_step(net: Net, with_bn: bool, x, labels, threads: int):
    """A zero-argument callable running one PyTorch train step, or None without PyTorch."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    layers: list[Any] = []
    for fan_in, fan_out in zip(net.dims[:-2], net.dims[1:-1]):
        if net.kind == "conv":
            layers.append(torch.nn.Conv2d(fan_in, fan_out, 3, padding=1, bias=not with_bn))
            if with_bn:
                layers.append(torch.nn.BatchNorm2d(fan_out, momentum=0.1, eps=1e-5))
        else:
            layers.append(torch.nn.Linear(fan_in, fan_out, bias=not with_bn))
            if with_bn:
                layers.append(torch.nn.BatchNorm1d(fan_out, momentum=0.1, eps=1e-5))
        layers.append(torch.nn.ReLU())
    if net.kind == "conv":
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    layers.append(torch.nn.Linear(net.dims[-2], net.dims[-1]))
    model = torch.nn.Sequential(*layers).train()
    tx = torch.from_numpy(np.array(x, np.float32))
    if net.kind == "conv":  # NHWC data: NCHW tensors in channels_last memory (no copy)
        tx = tx.permute(0, 3, 1, 2)
        model = model.to(memory_format=torch.channels_last)
    tl = torch.from_numpy(np.array(labels)).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(tx), tl)
        loss.backward()
        optimizer.step()
        return loss
    return run


# ---------------------------------------------------------------------------------------------
# Passes over the activations in the compiled HLO.

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*?)\)(?:, |$)")
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")
# Operations that move no data (views, tuples) or are not passes.
_FREE = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
         "partition-id", "replica-id"}


def _sizes(shape_text: str) -> list[int]:
    return [int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dims in _ARRAY.findall(shape_text)]


def _entry(hlo: str) -> list[str]:
    lines = hlo.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("ENTRY"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("}"))
    return lines[start + 1:end]


def count_passes(hlo: str, sizes: tuple[int, ...]) -> dict[str, Any]:
    """Reads and writes of arrays with one of the element counts ``sizes``, by the top-level
    operations of the compiled module's entry computation.

    Returns ``{"reads": n, "writes": n, "by_op": {op: n}}``; ``by_op`` names each operation by
    its kind (``fusion``, ``custom-call:<target>``, ``dot``, ``convolution``, ``copy``...) and
    counts the activation-sized arrays it reads plus those it writes.
    """
    targets = set(sizes)
    shapes: dict[str, list[int]] = {}
    reads = writes = 0
    by_op: Counter = Counter()
    for line in _entry(hlo):
        m = _INSTRUCTION.match(line)
        if m is None:
            continue
        name, shape, op, operands = m.groups()
        shapes[name] = _sizes(shape)
        if op in _FREE:
            continue
        if op == "custom-call":
            target = re.search(r'custom_call_target="([^"]+)"', line)
            op = f"custom-call:{target.group(1) if target else '?'}"
        n_in = sum(1 for o in re.findall(r"%([\w.\-]+)", operands)
                   if any(s in targets for s in shapes.get(o, [])))
        n_out = sum(1 for s in shapes[name] if s in targets)
        reads, writes = reads + n_in, writes + n_out
        if n_in + n_out:
            by_op[op] += n_in + n_out
    return {"reads": reads, "writes": writes, "by_op": dict(by_op)}


# ---------------------------------------------------------------------------------------------
# The benchmark: every variant of a net timed in the same interleaved rounds.

# (row name, NORMS entry, native kernels on): the jaxbn variants with and without the kernels.
JAX_VARIANTS = [("none", "none", True), ("jaxbn", "jaxbn", True),
                ("jaxbn-unfused", "jaxbn-unfused", True), ("jaxbn jnp", "jaxbn", False),
                ("jaxbn-unfused jnp", "jaxbn-unfused", False), ("flax", "flax", True)]
# Overhead of batch norm per framework: (row with batch norm, row without).
OVERHEADS = {"jaxbn": ("jaxbn", "none"), "jaxbn-unfused": ("jaxbn-unfused", "none"),
             "jaxbn jnp": ("jaxbn jnp", "none"), "flax": ("flax", "none"),
             "torch": ("torch bn", "torch none")}


def compiled_step(net: Net, norm: str, native: bool, key: jax.Array):
    """``(run, hlo)``: a zero-argument call of the compiled step on fixed inputs, and its HLO."""
    params = used_params(net, norm, key)
    x, labels = inputs(net, jax.random.fold_in(key, 1))
    states = init_state(net)
    with native_kernels(native):  # the switch is read when the step is traced
        compiled = make_step(net, norm).lower(params, states, x, labels).compile()
    return (lambda: compiled(params, states, x, labels)), compiled.as_text()


def bench_net(net: Net, repeats: int, threads: int) -> dict[str, Any]:
    """Median step times (seconds), batch-norm overheads and pass counts of every variant."""
    key = jax.random.key(0)
    fns, passes = {}, {}
    for name, norm, native in JAX_VARIANTS:
        fns[name], hlo = compiled_step(net, norm, native, key)
        passes[name] = count_passes(hlo, net.activation_sizes)
    x, labels = inputs(net, jax.random.fold_in(key, 1))
    for with_bn in (False, True):
        run = torch_step(net, with_bn, x, labels, threads)
        if run is not None:
            fns["torch bn" if with_bn else "torch none"] = run
    times = interleaved_times(fns, repeats=repeats, warmup=2)
    seconds = {name: statistics.median(ts) for name, ts in times.items()}
    # The overhead per round (both steps of a pair ran in it), then its median.
    overhead = {fw: statistics.median(a - b for a, b in zip(times[bn], times[base]))
                for fw, (bn, base) in OVERHEADS.items() if bn in times and base in times}
    return {"net": net.kind, "batch": list(net.batch), "dims": list(net.dims),
            "seconds": seconds, "overhead_seconds": overhead, "passes": passes}


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def format_table(result: dict[str, Any]) -> str:
    """The printed table: step times, overheads and passes per net; then the dropout row."""
    lines = [f"train step (forward + backward + SGD), median ms over interleaved rounds; "
             f"load average {result['load_before']} -> {result['load_after']}"]
    for row in result["nets"]:
        lines.append(f"\n{row['net']} {'x'.join(map(str, row['batch']))}, dims {row['dims']}")
        lines.append(f"  {'variant':<20} {'step ms':>9} {'passes (r+w)':>13}")
        for name, sec in row["seconds"].items():
            p = row["passes"].get(name)
            count = f"{p['reads']}+{p['writes']}" if p else "-"
            lines.append(f"  {name:<20} {sec * 1e3:9.2f} {count:>13}")
        lines.append("  batch-norm overhead (step with BN - without), ms:")
        flax = row["overhead_seconds"].get("flax")
        torch = row["overhead_seconds"].get("torch")
        for fw, sec in row["overhead_seconds"].items():
            ratios = [f"{sec / ref:.2f}x {name}'s" for name, ref in (("flax", flax),
                                                                      ("torch", torch))
                      if ref is not None and name != fw and ref > 0 and sec > 0]
            lines.append(f"    {fw:<18} {sec * 1e3:8.2f}  {'  '.join(ratios)}")
    d = result["dropout"]
    lines.append(f"\ndropout (rate 0.5) {'x'.join(map(str, d['shape']))}, forward + backward, "
                 f"median ms")
    for name, sec in d["seconds"].items():
        lines.append(f"  {name:<22} {sec * 1e3:8.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m experiments.train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small nets, few repetitions")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "results"))
    args = parser.parse_args(argv)
    from experiments.benchmark import bench_dropout  # one dropout benchmark, shared
    from experiments.timing import calm_openmp

    torch_openmp = calm_openmp()

    repeats = args.repeats or (3 if args.quick else 30)
    nets = (QUICK_MLP, QUICK_CONV) if args.quick else (MLP, CONV)
    threads = os.cpu_count() or 1
    load_before = _load()
    rows = [bench_net(net, repeats, threads) for net in nets]
    dropout = bench_dropout((256, 128) if args.quick else (4096, 1024), repeats)
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "machine": platform.machine(), "cpus": os.cpu_count(), "jax": jax.__version__,
              "native": jaxbn.native_status(), "quick": args.quick, "repeats": repeats,
              "torch_openmp": torch_openmp, "load_before": load_before, "load_after": _load(),
              "nets": rows,
              "dropout": dropout}
    print(format_table(result))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
