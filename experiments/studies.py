"""The assignment's studies of batch norm, layer norm and dropout, as importable functions.

Each study takes a :class:`Context` and returns a JSON-serializable dict of raw numbers (with the
hyperparameters it used under ``"config"``, and its seeds); :mod:`experiments.report` plots them
and writes the findings from those numbers. Every setting runs on all the context's seeds at once
(:func:`experiments.seeds.fit_seeds`); per-seed numbers are stored with the seed axis first.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Splits
from experiments.seeds import SeedData, fit_seeds, init_seeds, stack_splits
from jaxbn import nets

NORMALIZATIONS = {"none": None, "batchnorm": "batchnorm", "layernorm": "layernorm"}


@dataclasses.dataclass
class Context:
    splits: list[Splits]  # NCHW image splits, one per seed (one shared for CIFAR-10)
    seeds: list[int]
    quick: bool = False
    progress: bool | None = None
    shared: bool = False  # one data split for every seed (CIFAR-10)

    def data(self, *, num_train: int | None = None, flat: bool = True,
             label_noise: float = 0.0) -> SeedData:
        return stack_splits(self.splits, num_train=num_train, flat=flat, shared=self.shared,
                            label_noise=label_noise, noise_seeds=self.seeds)


def _clean(a) -> list:
    """Arrays to JSON lists, non-finite values as None."""
    a = np.asarray(a, np.float64)
    return [None if not np.isfinite(v) else float(v) for v in a.ravel()] if a.ndim <= 1 else \
        [_clean(row) for row in a]


def _per_seed(history: dict[str, np.ndarray], model: int = 0) -> dict[str, list]:
    """One model's histories, ``(S, steps)`` and ``(S, epochs)``, as JSON lists."""
    return {k: _clean(v[..., model]) for k, v in history.items()}


def _mlp_runs(ctx: Context, data: SeedData, *, hidden_dims, normalization, epochs, batch_size,
              lr, weight_scale, dropout_rate=0.0, desc="") -> dict[str, list]:
    init = functools.partial(nets.init_mlp, input_dim=data.x_train.shape[-1],
                             hidden_dims=hidden_dims, num_classes=10, normalization=normalization,
                             dropout_rate=dropout_rate, weight_scale=weight_scale)
    params, state = init_seeds(init, ctx.seeds)
    history = fit_seeds(nets.apply_mlp, params, state, optax.adam(lr), data, ctx.seeds,
                        epochs=epochs, batch_size=batch_size, progress=ctx.progress, desc=desc)
    return _per_seed(history)


def bn_vs_baseline(ctx: Context) -> dict[str, Any]:
    """Six-layer net with batch norm, layer norm and none: loss and accuracy curves."""
    config = dict(hidden_dims=[100] * 5, weight_scale=2e-2, lr=1e-3, batch_size=50,
                  epochs=3 if ctx.quick else 10, num_train=300 if ctx.quick else 1000,
                  momentum=0.9)
    data = ctx.data(num_train=config["num_train"])
    runs = {name: _mlp_runs(ctx, data, hidden_dims=config["hidden_dims"], normalization=norm,
                            epochs=config["epochs"], batch_size=config["batch_size"],
                            lr=config["lr"], weight_scale=config["weight_scale"],
                            desc=f"bn_vs_baseline {name}")
            for name, norm in NORMALIZATIONS.items()}
    return {"config": config, "seeds": ctx.seeds, "runs": runs}


def weight_scale(ctx: Context) -> dict[str, Any]:
    """Eight-layer nets over a range of weight scales, batch norm vs none: every scale and seed
    trained together (models stacked per seed, seeds mapped)."""
    num = 6 if ctx.quick else 20
    config = dict(hidden_dims=[50] * 7, weight_scales=np.logspace(-4, 0, num).tolist(),
                  lr=1e-3, batch_size=50, epochs=2 if ctx.quick else 10,
                  num_train=300 if ctx.quick else 1000)
    data = ctx.data(num_train=config["num_train"])
    scales = jnp.asarray(config["weight_scales"], jnp.float32)
    out = {"config": config, "seeds": ctx.seeds}
    for name in ("batchnorm", "none"):
        init = functools.partial(nets.init_mlp, input_dim=data.x_train.shape[-1],
                                 hidden_dims=config["hidden_dims"], num_classes=10,
                                 normalization=NORMALIZATIONS[name], weight_scale=1.0)
        params, state = init_seeds(init, ctx.seeds, num_models=num)
        # init's weights scale linearly with weight_scale: model m gets scale m.
        params = {k: (v * scales.reshape(1, -1, 1, 1) if k.startswith("W") else v)
                  for k, v in params.items()}
        hist = fit_seeds(nets.apply_mlp, params, state, optax.adam(config["lr"]), data,
                         ctx.seeds, epochs=config["epochs"], batch_size=config["batch_size"],
                         progress=ctx.progress, desc=f"weight_scale {name}")
        steps = hist["loss"].shape[1] // config["epochs"]
        out[name] = {"best_val_acc": _clean(hist["val_acc"].max(1)),  # (S, scales)
                     "best_train_acc": _clean(hist["train_acc"].max(1)),
                     "final_loss": _clean(np.mean(hist["loss"][:, -steps:], axis=1))}
    return out


def batch_size(ctx: Context) -> dict[str, Any]:
    """Batch sizes 5/10/50 with batch norm and layer norm; the assignment's baseline without
    normalization at the smallest batch size."""
    config = dict(hidden_dims=[100] * 5, weight_scale=2e-2, lr=10 ** -3.5,
                  batch_sizes=[5, 10, 50], epochs=2 if ctx.quick else 10,
                  num_train=200 if ctx.quick else 1000, momentum=0.9)
    data = ctx.data(num_train=config["num_train"])
    runs = {}
    for name, norm in NORMALIZATIONS.items():
        for bs in config["batch_sizes"][:1] if norm is None else config["batch_sizes"]:
            runs[f"{name}/{bs}"] = _mlp_runs(
                ctx, data, hidden_dims=config["hidden_dims"], normalization=norm,
                epochs=config["epochs"], batch_size=bs, lr=config["lr"],
                weight_scale=config["weight_scale"], desc=f"batch_size {name} {bs}")
    return {"config": config, "seeds": ctx.seeds, "runs": runs}


def dropout(ctx: Context) -> dict[str, Any]:
    """One hidden layer of 500 on 500 examples with 30% of their labels replaced by random ones,
    trained long enough to memorize them; drop rate 0 vs 0.75 (the 2018+ notebook's keep 0.25)."""
    config = dict(hidden_dims=[500], rates=[0.0, 0.75], lr=1e-3, batch_size=100,
                  epochs=8 if ctx.quick else 60, num_train=300 if ctx.quick else 500,
                  weight_scale=5e-2, label_noise=0.3)
    data = ctx.data(num_train=config["num_train"], label_noise=config["label_noise"])
    runs = {str(rate): _mlp_runs(ctx, data, hidden_dims=config["hidden_dims"], normalization=None,
                                 epochs=config["epochs"], batch_size=config["batch_size"],
                                 lr=config["lr"], weight_scale=config["weight_scale"],
                                 dropout_rate=rate, desc=f"dropout {rate}")
            for rate in config["rates"]}
    return {"config": config, "seeds": ctx.seeds, "runs": runs}


def spatial_bn(ctx: Context) -> dict[str, Any]:
    """The small conv net with and without spatial batch norm."""
    config = dict(conv_channels=[8, 16], hidden_dims=[100], lr=1e-3, batch_size=50,
                  epochs=2 if ctx.quick else 10, num_train=300 if ctx.quick else None,
                  weight_scale="He (sqrt(2 / fan_in))", momentum=0.9)
    data = ctx.data(num_train=config["num_train"], flat=False)
    runs = {}
    for name in ("batchnorm", "none"):
        init = functools.partial(nets.init_conv_net, input_shape=data.x_train.shape[-3:],
                                 conv_channels=config["conv_channels"],
                                 hidden_dims=config["hidden_dims"], num_classes=10,
                                 normalization=NORMALIZATIONS[name])
        params, state = init_seeds(init, ctx.seeds)
        history = fit_seeds(nets.apply_conv_net, params, state, optax.adam(config["lr"]), data,
                            ctx.seeds, epochs=config["epochs"], batch_size=config["batch_size"],
                            progress=ctx.progress, desc=f"spatial_bn {name}")
        runs[name] = _per_seed(history)
    config["num_train"] = data.num_train
    return {"config": config, "seeds": ctx.seeds, "runs": runs}
