"""Data-parallel training with synchronized batch norm on 8 simulated CPU devices.

``python -m experiments.data_parallel`` trains the same MLP with batch norm twice on the digits
data, on the same sequence of global batches: once on one device with the whole batch, once with the
batch split over 8 devices under ``jax.shard_map``, batch norm synchronized with
``axis_name="data"`` (statistics over the global batch) and gradients summed across devices. It
prints both loss curves and their largest difference, and exits non-zero if they disagree.

The 8 devices are simulated: ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` is set before
JAX starts (this module does it when run as a script; with real accelerators drop it).
"""

from __future__ import annotations

import argparse
import os
import sys

NUM_DEVICES = 8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.data_parallel",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.batch_size % NUM_DEVICES:
        parser.error(f"--batch-size must be a multiple of {NUM_DEVICES}")

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
    a, b = curves.values()
    diff = float(np.max(np.abs(a - b)))
    print(f"{'step':>5} {'1 device':>10} {f'{NUM_DEVICES} devices':>10}")
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{i:5d} {a[i]:10.5f} {b[i]:10.5f}")
    print(f"largest loss difference over {args.steps} steps: {diff:.2e}")
    return 0 if diff <= 1e-4 * max(1.0, float(np.max(np.abs(a)))) else 1


if __name__ == "__main__":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={NUM_DEVICES}")
    sys.exit(main())
