"""The assignment's studies of batch norm, layer norm and dropout, as importable functions.

Each study takes a :class:`Context` and returns a JSON-serializable dict of raw numbers (with the
hyperparameters it used under ``"config"``); :mod:`experiments.report` plots them and writes the
findings from those numbers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Splits, flatten
from jaxbn import nets, training

NORMALIZATIONS = {"none": None, "batchnorm": "batchnorm", "layernorm": "layernorm"}


@dataclasses.dataclass
class Context:
    data: Splits  # NCHW image splits
    quick: bool = False
    seed: int = 0
    progress: bool | None = None

    @property
    def flat(self) -> Splits:
        return flatten(self.data)


def _fit_mlp(ctx: Context, hidden_dims, normalization, *, num_train, epochs, batch_size, lr,
             weight_scale, dropout_rate=0.0, desc="", seed_offset=0) -> dict[str, Any]:
    (x, y), val = ctx.flat["train"], ctx.flat["val"]
    x, y = x[:num_train], y[:num_train]
    key = jax.random.key(ctx.seed + seed_offset)
    params, state = nets.init_mlp(key, x.shape[1], hidden_dims, 10, normalization=normalization,
                                  dropout_rate=dropout_rate, weight_scale=weight_scale)
    result = training.fit(nets.apply_mlp, params, state, optax.adam(lr), (x, y), val_data=val,
                          key=jax.random.fold_in(key, 1), epochs=epochs, batch_size=batch_size,
                          progress=ctx.progress, desc=desc)
    return {k: _clean(v) for k, v in result.history.items()}


def _clean(a) -> list:
    """Arrays to JSON lists, non-finite values as None."""
    a = np.asarray(a, np.float64)
    return [None if not np.isfinite(v) else float(v) for v in a.ravel()] if a.ndim <= 1 else \
        [_clean(row) for row in a]


def bn_vs_baseline(ctx: Context) -> dict[str, Any]:
    """Six-layer net with batch norm, layer norm and none: loss and accuracy curves."""
    config = dict(hidden_dims=[100] * 5, weight_scale=2e-2, lr=1e-3, batch_size=50,
                  epochs=3 if ctx.quick else 10, num_train=300 if ctx.quick else 1000)
    runs = {name: _fit_mlp(ctx, config["hidden_dims"], norm, num_train=config["num_train"],
                           epochs=config["epochs"], batch_size=config["batch_size"],
                           lr=config["lr"], weight_scale=config["weight_scale"],
                           desc=f"bn_vs_baseline {name}")
            for name, norm in NORMALIZATIONS.items()}
    return {"config": config, "runs": runs}


def weight_scale(ctx: Context) -> dict[str, Any]:
    """Eight-layer nets over a range of weight scales, batch norm vs none, trained with vmap."""
    num = 6 if ctx.quick else 20
    config = dict(hidden_dims=[50] * 7, weight_scales=np.logspace(-4, 0, num).tolist(),
                  lr=1e-3, batch_size=50, epochs=2 if ctx.quick else 10,
                  num_train=300 if ctx.quick else 1000)
    (x, y), val = ctx.flat["train"], ctx.flat["val"]
    x, y = x[:config["num_train"]], y[:config["num_train"]]
    out = {"config": config}
    for name in ("batchnorm", "none"):
        keys = jax.random.split(jax.random.key(ctx.seed), num)
        scales = jnp.asarray(config["weight_scales"], jnp.float32)
        # One model per weight scale, stacked on a leading axis: init's weights scale linearly.
        params, state = jax.vmap(lambda k: nets.init_mlp(
            k, x.shape[1], config["hidden_dims"], 10, normalization=NORMALIZATIONS[name],
            weight_scale=1.0))(keys)
        params = {k: (v * scales.reshape(-1, 1, 1) if k.startswith("W") else v)
                  for k, v in params.items()}
        result = training.fit(nets.apply_mlp, params, state, optax.adam(config["lr"]), (x, y),
                              val_data=val, key=jax.random.key(ctx.seed + 1),
                              epochs=config["epochs"], batch_size=config["batch_size"],
                              stacked=True, progress=ctx.progress, desc=f"weight_scale {name}")
        hist = result.history
        iters = hist["loss"].shape[0] // config["epochs"]
        out[name] = {"best_val_acc": _clean(hist["val_acc"].max(0)),
                     "best_train_acc": _clean(hist["train_acc"].max(0)),
                     "final_loss": _clean(np.mean(hist["loss"][-iters:], axis=0))}
    return out


def batch_size(ctx: Context) -> dict[str, Any]:
    """Batch sizes 5/10/50 with batch norm, layer norm and none."""
    config = dict(hidden_dims=[100] * 5, weight_scale=2e-2, lr=10 ** -3.5,
                  batch_sizes=[5, 10, 50], epochs=2 if ctx.quick else 10,
                  num_train=200 if ctx.quick else 1000)
    runs = {}
    for name, norm in NORMALIZATIONS.items():
        for bs in config["batch_sizes"]:
            runs[f"{name}/{bs}"] = _fit_mlp(
                ctx, config["hidden_dims"], norm, num_train=config["num_train"],
                epochs=config["epochs"], batch_size=bs, lr=config["lr"],
                weight_scale=config["weight_scale"], desc=f"batch_size {name} {bs}")
    return {"config": config, "runs": runs}


def dropout(ctx: Context) -> dict[str, Any]:
    """One hidden layer of 500 on 500 examples, drop rate 0 vs 0.75: the regularization gap."""
    config = dict(hidden_dims=[500], rates=[0.0, 0.75], lr=5e-4, batch_size=100,
                  epochs=4 if ctx.quick else 25, num_train=500, weight_scale=5e-2)
    runs = {str(rate): _fit_mlp(ctx, config["hidden_dims"], None, num_train=config["num_train"],
                                epochs=config["epochs"], batch_size=config["batch_size"],
                                lr=config["lr"], weight_scale=config["weight_scale"],
                                dropout_rate=rate, desc=f"dropout {rate}")
            for rate in config["rates"]}
    return {"config": config, "runs": runs}


def spatial_bn(ctx: Context) -> dict[str, Any]:
    """The small conv net with and without spatial batch norm."""
    config = dict(conv_channels=[16, 32], hidden_dims=[100], lr=1e-3, batch_size=50,
                  epochs=2 if ctx.quick else 10, weight_scale=None)
    (x, y), val = ctx.data["train"], ctx.data["val"]
    runs = {}
    for name in ("batchnorm", "none"):
        key = jax.random.key(ctx.seed)
        params, state = nets.init_conv_net(key, x.shape[1:], config["conv_channels"],
                                           config["hidden_dims"], 10,
                                           normalization=NORMALIZATIONS[name])
        result = training.fit(nets.apply_conv_net, params, state, optax.adam(config["lr"]),
                              (x, y), val_data=val, key=jax.random.fold_in(key, 1),
                              epochs=config["epochs"], batch_size=config["batch_size"],
                              progress=ctx.progress, desc=f"spatial_bn {name}")
        runs[name] = {k: _clean(v) for k, v in result.history.items()}
    config["weight_scale"] = "He (sqrt(2 / fan_in))"
    return {"config": config, "runs": runs}
