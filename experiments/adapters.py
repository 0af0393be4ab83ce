"""The framework adapters against the frameworks' own layers: bytes kept between forward and
backward, and time of forward + backward, for the batch norm layer alone and for one train step
of a small conv net (conv, batch norm, relu, dropout, pooling, dense).

Run by ``python -m experiments.benchmark`` (which prints the table and writes it to its JSON);
frameworks that are not installed are skipped.
"""

from __future__ import annotations

import functools
import importlib
import statistics

import jax
import jax.numpy as jnp

from experiments.timing import interleaved_times

LAYER_SHAPE = (64, 32, 32, 64)  # N, H, W, C (Equinox: per example C, H, W)


def _residual_bytes(f, *args) -> int:
    _, pullback = jax.vjp(f, *args)
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "nbytes")))


def _nnx_layer(layers, x):
    from flax import nnx

    graphdef, params, rest = nnx.split(layers.BatchNorm(x.shape[-1], rngs=nnx.Rngs(0)),
                                       nnx.Param, ...)

    def f(p, x):
        return nnx.merge(graphdef, p, jax.tree.map(jnp.array, rest))(x)
    return f, params


def _linen_layer(layers, x):
    layer = layers.BatchNorm(use_running_average=False)
    variables = layer.init(jax.random.key(0), x)

    def f(p, x):
        return layer.apply({**variables, "params": p}, x, mutable=["batch_stats"])[0]
    return f, variables["params"]


def _equinox_layer(layers, x):
    import equinox as eqx

    model, state = eqx.nn.make_with_state(layers.BatchNorm)(x.shape[1], "batch", mode="batch",
                                                            dtype=x.dtype)

    leaves, treedef = jax.tree.flatten(state)

    def f(p, x):  # x is NCHW: Equinox's examples are (C, H, W)
        m = eqx.tree_at(lambda m: (m.weight, m.bias), model, p)
        fresh = jax.tree.unflatten(treedef, leaves)  # an Equinox State is used once
        return jax.vmap(lambda xi: m(xi, fresh)[0], axis_name="batch")(x)
    return f, (model.weight, model.bias)


FRAMEWORKS = {  # name: (its layers, jaxbn's adapter module, layer builder, its image layout)
    "flax.nnx": ("flax.nnx", "jaxbn.flax.nnx", _nnx_layer, "NHWC"),
    "flax.linen": ("flax.linen", "jaxbn.flax.linen", _linen_layer, "NHWC"),
    "equinox": ("equinox.nn", "jaxbn.equinox", _equinox_layer, "NCHW"),
}


def _vjp_run(f):
    @jax.jit
    def run(p, x, dy):
        y, pullback = jax.vjp(f, p, x)
        return y, pullback(dy)
    return run


def bench_layer(name: str, shape=LAYER_SHAPE, repeats: int = 15) -> dict | None:
    """Residual bytes and median ms of one batch norm layer's VJP, framework vs jaxbn."""
    theirs, ours, build, layout = FRAMEWORKS[name]
    try:
        layers = {"framework": importlib.import_module(theirs),
                  "jaxbn": importlib.import_module(ours)}
    except ImportError:
        return None
    if layout == "NCHW":
        shape = (shape[0], shape[3], shape[1], shape[2])
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    dy = jax.random.normal(jax.random.key(1), shape, jnp.float32)
    built = {k: build(mod, x) for k, mod in layers.items()}
    residual = {k: _residual_bytes(f, p, x) for k, (f, p) in built.items()}
    fns = {k: functools.partial(_vjp_run(f), p, x, dy) for k, (f, p) in built.items()}
    times = interleaved_times(fns, repeats=repeats, warmup=2)
    return {"framework": name, "shape": list(shape), "layout": layout, "x_bytes": int(x.nbytes),
            "residual_bytes": residual,
            "seconds": {k: statistics.median(v) for k, v in times.items()}}


def bench_adapters(repeats: int = 15, shape=LAYER_SHAPE) -> list[dict]:
    rows = [bench_layer(name, shape, repeats) for name in FRAMEWORKS]
    return [r for r in rows if r is not None]


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print("\nframework adapters: one batch norm layer, forward + backward, float32, median ms")
    print(f"{'framework':>11} {'x':>16} {'residual/x (fw)':>16} {'residual/x (jaxbn)':>19} "
          f"{'ms (fw)':>8} {'ms (jaxbn)':>10} {'speedup':>8}")
    for r in rows:
        res, sec = r["residual_bytes"], r["seconds"]
        shape = f"{'x'.join(map(str, r['shape']))} {r['layout']}"
        print(f"{r['framework']:>11} {shape:>16} {res['framework'] / r['x_bytes']:16.2f} "
              f"{res['jaxbn'] / r['x_bytes']:19.2f} {sec['framework'] * 1e3:8.2f} "
              f"{sec['jaxbn'] * 1e3:10.2f} {sec['framework'] / sec['jaxbn']:8.2f}")
