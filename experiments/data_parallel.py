"""Data-parallel training with batch norm over the global batch: on one process, or several.

``python -m experiments.data_parallel`` trains the same MLP with batch norm twice on the digits
data, on the same sequence of global batches: once on one device with the whole batch, once with the
batch split over 8 simulated devices under ``jax.shard_map``, batch norm synchronized with
``axis_name="data"`` (statistics over the global batch) and gradients summed across devices.

``python -m experiments.data_parallel --processes 2 --devices-per-process 2`` starts that many JAX
processes on this machine (``jax.distributed.initialize`` on 127.0.0.1, a free port or ``--port``,
the CPU collectives), each with that many simulated CPU devices, and trains with
``jaxbn.training.fit(..., mesh=...)`` on all of them; process 0 then trains the same model with
``fit`` on one device. This run uses SGD with momentum: Adam's default ``eps=1e-8`` turns the
round-off in near-zero gradient entries into full-size steps, so any change of summation order
(even jaxbn's native kernels against its jnp rules, on one device) moves the two loss curves
~3e-4 apart within 40 steps, while with SGD they stay within 1e-6 and the check can be tight.

Either way it prints both loss curves and their largest difference, and exits non-zero if they
disagree (or if a process fails, or the run outlives ``--timeout``). Simulated devices are set up
before JAX starts (this module does it; with real accelerators drop them).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import NamedTuple

NUM_DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.data_parallel",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="steps of the shard_map run")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=None,
                        help="start this many local JAX processes and train with fit(mesh=...)")
    parser.add_argument("--devices-per-process", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the fit(mesh=...) run")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before every process is stopped (default 300)")
    parser.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.processes is None:
        if args.batch_size % NUM_DEVICES:
            parser.error(f"--batch-size must be a multiple of {NUM_DEVICES}")
        return run_shard_map(args)
    if args.processes < 1 or args.devices_per_process < 1:
        parser.error("--processes and --devices-per-process must be at least 1")
    if args.batch_size % (args.processes * args.devices_per_process):
        parser.error(f"--batch-size must be a multiple of the {args.processes} x "
                     f"{args.devices_per_process} devices")
    if args.process_id is not None:
        return run_fit_process(args)
    return run_processes(args)


# ---------------------------------------------------------------------------------------------
# Several local processes


class Finished(NamedTuple):
    """How one process of a :func:`launch` ended."""

    returncode: int | None  # None: still running at the deadline, then killed
    stdout: str
    stderr: str
    seconds: float  # from the start of the launch to its end (or the kill)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> str | None:
    """Why ``port`` on 127.0.0.1 cannot host the coordinator, or None when it is free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            return (f"port {port} on 127.0.0.1 is taken ({e.strerror}): pass another --port, or "
                    f"leave --port out to pick a free one.")
    return None


def launch(commands: Sequence[Sequence[str]], *, envs: Sequence[dict] | None = None,
           cwd: str = ROOT, timeout: float = 300.0, grace: float = 60.0) -> list[Finished]:
    """Runs one local process per command and waits for all of them, bounded in time.

    Every process gets this environment plus its entry of ``envs``, without ``XLA_FLAGS`` (each
    sets up its own devices) and without proxy settings (the processes talk over 127.0.0.1 only),
    and runs in ``cwd`` (default: the repository root). When one exits with an error the others
    get ``grace`` seconds to stop on their own (they should: their next collective fails);
    whatever still runs then, or at ``timeout``, is killed.
    """
    base = {k: v for k, v in os.environ.items()
            if k != "XLA_FLAGS" and not k.lower().endswith("_proxy")}
    start, procs, logs = time.monotonic(), [], []
    for i, command in enumerate(commands):
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        env = {**base, **(envs[i] if envs else {})}
        procs.append(subprocess.Popen(list(command), stdout=out, stderr=err, env=env, cwd=cwd))
        logs.append((out, err))
    ended = [None] * len(procs)
    deadline = start + timeout
    while any(e is None for e in ended):
        now = time.monotonic()
        for i, proc in enumerate(procs):
            if ended[i] is None and proc.poll() is not None:
                ended[i] = now - start
                if proc.returncode != 0:
                    deadline = min(deadline, now + grace)
        if now >= deadline:
            break
        time.sleep(0.05)
    finished = []
    for proc, seconds, (out, err) in zip(procs, ended, logs):
        if seconds is None:
            proc.kill()
            proc.wait()
        out.seek(0), err.seek(0)
        finished.append(Finished(None if seconds is None else proc.returncode, out.read(),
                                 err.read(), time.monotonic() - start if seconds is None
                                 else seconds))
        out.close(), err.close()
    return finished


def run_processes(args) -> int:
    """The launcher: one process per ``--process-id``, then their output and a verdict."""
    port = args.port if args.port is not None else free_port()
    taken = check_port(port)
    if taken:
        print(taken, file=sys.stderr)
        return 2
    argv = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in
            ("processes", "devices_per_process", "epochs", "batch_size", "seed")]
    commands = [[sys.executable, "-m", "experiments.data_parallel", *argv, f"--port={port}",
                 f"--process-id={i}"] for i in range(args.processes)]
    print(f"{args.processes} processes x {args.devices_per_process} CPU devices, coordinator "
          f"127.0.0.1:{port}", flush=True)
    finished = launch(commands, timeout=args.timeout)
    print(finished[0].stdout, end="")
    status = 0
    for i, f in enumerate(finished):
        if f.returncode != 0:
            what = (f"still running after {args.timeout:.0f} s, killed" if f.returncode is None
                    else f"exit code {f.returncode}")
            print(f"process {i}: {what}\n{f.stderr[-2000:]}", file=sys.stderr)
            status = status or 1
    return status


def run_fit_process(args) -> int:
    """One process of the multi-process run: fit(mesh=...) over every process's devices."""
    import jax

    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{args.port}", args.processes, args.process_id,
                               coordinator_bind_address=f"127.0.0.1:{args.port}",
                               initialization_timeout=60, heartbeat_timeout_seconds=20)
    import optax

    from experiments.data import flatten, load_digits
    from jaxbn import nets, training

    data = flatten(load_digits(args.seed))
    params, state = nets.init_mlp(jax.random.key(args.seed), data["train"][0].shape[1],
                                  [100, 100], 10, normalization="batchnorm", weight_scale=5e-2)
    kwargs = dict(key=jax.random.key(args.seed + 1), epochs=args.epochs,
                  batch_size=args.batch_size, val_data=data["val"], progress=False)
    optimizer = optax.sgd(0.05, momentum=0.9)
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    try:
        many = training.fit(nets.apply_mlp, params, state, optimizer, data["train"], mesh=mesh,
                            **kwargs)
    except RuntimeError as e:  # another process died: say so, and stop now
        print(e, file=sys.stderr, flush=True)
        os._exit(3)
    if jax.process_index() != 0:
        return 0
    one = training.fit(nets.apply_mlp, params, state, optimizer, data["train"], **kwargs)
    return compare_curves({"1 device": one.history["loss"],
                           f"{jax.device_count()} devices": many.history["loss"]}, tolerance=1e-5)


def compare_curves(curves: dict, tolerance: float) -> int:
    """Prints two loss curves side by side and their largest difference; 0 if it is within
    ``tolerance`` (relative to the largest loss, or absolute below 1), else 1."""
    import numpy as np

    (name_a, a), (name_b, b) = curves.items()
    diff = float(np.max(np.abs(a - b)))
    print(f"{'step':>5} {name_a:>10} {name_b:>10}")
    for i in range(0, len(a), max(1, len(a) // 10)):
        print(f"{i:5d} {a[i]:10.5f} {b[i]:10.5f}")
    print(f"largest loss difference over {len(a)} steps: {diff:.2e}")
    return 0 if diff <= tolerance * max(1.0, float(np.max(np.abs(a)))) else 1


# ---------------------------------------------------------------------------------------------
# One process, 8 simulated devices, shard_map


def run_shard_map(args) -> int:
    """shard_map with batch norm synchronized over ``"data"`` against one device."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from experiments.data import flatten, load_digits
    from jaxbn import nets

    if jax.device_count() < NUM_DEVICES:
        print(f"needs {NUM_DEVICES} devices, found {jax.device_count()}: run as "
              f"`python -m experiments.data_parallel` (it sets XLA_FLAGS before JAX starts).",
              file=sys.stderr)
        return 2
    (x, y) = flatten(load_digits(args.seed))["train"]
    params, state = nets.init_mlp(jax.random.key(args.seed), x.shape[1], [100, 100], 10,
                                  normalization="batchnorm", weight_scale=5e-2)
    optimizer = optax.adam(1e-3)
    rng = np.random.default_rng(args.seed)
    batches = [rng.choice(len(x), args.batch_size, replace=False) for _ in range(args.steps)]

    def make_step(state_template, reduce):
        def step(params, bn, opt_state, xb, yb):
            def loss_fn(p):
                scores, new = nets.apply_mlp(p, dataclasses.replace(state_template, batch_norm=bn),
                                             xb, train=True)
                # Sum over the local examples divided by the global batch size: summed across
                # devices, it is the global mean (and its gradient the global mean gradient).
                local = nets.softmax_cross_entropy(scores, yb) * xb.shape[0] / args.batch_size
                return local, new.batch_norm

            (loss, bn), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            loss = reduce(loss)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), bn, opt_state, loss
        return step

    single = jax.jit(make_step(state, lambda v: v))
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
    synced = dataclasses.replace(state, axis_name="data")
    sharded = jax.jit(jax.shard_map(
        make_step(synced, lambda v: jax.lax.psum(v, "data")), mesh=mesh,
        in_specs=(P(), P(), P(), P("data"), P("data")), out_specs=(P(), P(), P(), P())))
    shard = NamedSharding(mesh, P("data"))

    curves = {}
    for name, step in (("1 device", single), (f"{NUM_DEVICES} devices", sharded)):
        p, bn, opt_state, losses = params, state.batch_norm, optimizer.init(params), []
        for idx in batches:
            xb, yb = jnp.asarray(x[idx]), jnp.asarray(y[idx])
            if step is sharded:
                xb, yb = jax.device_put(xb, shard), jax.device_put(yb, shard)
            p, bn, opt_state, loss = step(p, bn, opt_state, xb, yb)
            losses.append(float(loss))
        curves[name] = np.array(losses)
    return compare_curves(curves, tolerance=1e-4)  # Adam: round-off grows (see the docstring)


if __name__ == "__main__":
    if not any(a.startswith("--processes") for a in sys.argv):
        os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    sys.exit(main())
