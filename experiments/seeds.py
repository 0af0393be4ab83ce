"""Several seeds of one setting trained at once: ``jax.vmap`` over the seeds of
:func:`jaxbn.training.make_epoch` (which itself maps over stacked models).

A seed fixes everything random in a run: the digits split (:func:`experiments.data.load_digits`),
the initial weights (``key(seed)``), and the shuffling and dropout masks (``fold_in(key(seed), 1)``,
then ``fold_in(., epoch)`` per epoch, as :func:`jaxbn.training.fit` does). Unlike
``fit(..., stacked=True)``, which trains stacked models on the *same* minibatches, every seed here
gets its own data order, split and masks, so the spread over seeds is the whole run-to-run spread.

``--seed S`` with ``--seeds K`` runs the block of seeds ``K*S .. K*S + K - 1`` (:func:`seed_block`):
``--seed 0, 1, 2`` are independent replications that share no seed.

Shapes: ``S`` seeds, ``M`` models per seed, ``N`` examples, ``E`` epochs, ``T`` steps.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.data import Splits, flatten
from jaxbn import training


def seed_block(seed: int, num_seeds: int) -> list[int]:
    """The seeds of block ``seed``: ``num_seeds * seed`` up to ``num_seeds * (seed + 1) - 1``."""
    if num_seeds < 1:
        raise ValueError(f"num_seeds must be at least 1; got {num_seeds}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0; got {seed}.")
    return list(range(num_seeds * seed, num_seeds * (seed + 1)))


@dataclasses.dataclass(frozen=True)
class SeedData:
    """Training and validation data of S seeds: ``(S, N, ...)`` arrays, or one shared ``(N, ...)``
    set for every seed (``shared``; CIFAR-10, whose split is fixed)."""

    x_train: jax.Array
    y_train: jax.Array
    x_val: jax.Array
    y_val: jax.Array
    shared: bool = False

    @property
    def num_train(self) -> int:
        return self.x_train.shape[0 if self.shared else 1]


def stack_splits(splits: list[Splits], *, num_train: int | None = None, flat: bool = False,
                 shared: bool = False, label_noise: float = 0.0,
                 noise_seeds: list[int] | None = None) -> SeedData:
    """One :class:`SeedData` from per-seed splits (the first ``num_train`` training examples).

    ``label_noise`` replaces that fraction of the training labels, drawn per seed with
    ``numpy.random.default_rng(noise_seeds[i])``, by labels drawn uniformly from the 10 classes
    (so about 9/10 of those end wrong); validation labels stay clean.
    """
    splits = [flatten(s) if flat else s for s in (splits[:1] if shared else splits)]
    xt = np.stack([s["train"][0][:num_train] for s in splits])
    yt = np.stack([s["train"][1][:num_train] for s in splits])
    for i in range(len(yt) if label_noise else 0):
        rng = np.random.default_rng([noise_seeds[i], 7])
        flip = rng.random(yt[i].shape) < label_noise
        yt[i] = np.where(flip, rng.integers(0, 10, yt[i].shape), yt[i])
    xv = np.stack([s["val"][0] for s in splits])
    yv = np.stack([s["val"][1] for s in splits])
    arrays = [jnp.asarray(a[0] if shared else a) for a in (xt, yt, xv, yv)]
    return SeedData(*arrays, shared=shared)


def init_seeds(init_fn: Callable[[jax.Array], tuple[Any, Any]], seeds: list[int],
               num_models: int = 1) -> tuple[Any, Any]:
    """``init_fn(key)`` for model ``m`` of each seed, stacked ``(S, M, ...)``; model ``m``'s key
    is ``fold_in(key(seed), m)`` (just ``key(seed)`` with one model per seed)."""
    def keys_of(seed):
        root = jax.random.key(seed)
        return (root[None] if num_models == 1 else
                jax.vmap(lambda m: jax.random.fold_in(root, m))(jnp.arange(num_models)))

    keys = jnp.stack([keys_of(s) for s in seeds])
    return jax.vmap(jax.vmap(init_fn))(keys)


def _progress(enabled: bool | None, total: int, desc: str):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


def fit_seeds(apply_fn: Callable, params: Any, net_state: Any,
              optimizer: optax.GradientTransformation, data: SeedData, seeds: list[int], *,
              epochs: int, batch_size: int, num_train_eval: int = 1000,
              progress: bool | None = None, desc: str = "") -> dict[str, np.ndarray]:
    """Trains ``(S, M, ...)`` stacked models, seed ``i`` on its own data with its own key.

    Each epoch is :func:`jaxbn.training.make_epoch`'s jitted scan, vmapped over the seeds; after
    it every model is evaluated in test mode on its seed's first ``num_train_eval`` training
    examples and on its validation set.

    Returns:
      ``loss`` ``(S, E * T, M)`` (train mode, per step), ``train_acc`` and ``val_acc``
      ``(S, E, M)`` (test mode, after each epoch).
    """
    epoch = training.make_epoch(apply_fn, optimizer, num_examples=data.num_train,
                                batch_size=batch_size)
    predict = training.make_predict(apply_fn)
    data_axis = None if data.shared else 0

    @jax.jit
    def seed_epoch(params, net_state, opt_state, x, y, keys, e):
        epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, e)
        return jax.vmap(epoch, in_axes=(0, 0, 0, data_axis, data_axis, 0))(
            params, net_state, opt_state, x, y, epoch_keys)

    # One test-mode pass per epoch over the training examples evaluated and the validation set.
    split = min(num_train_eval, data.num_train)
    axis = 0 if data.shared else 1
    x_eval = jnp.concatenate([jax.lax.slice_in_dim(data.x_train, 0, split, axis=axis),
                              data.x_val], axis=axis)
    y_eval = jnp.concatenate([jax.lax.slice_in_dim(data.y_train, 0, split, axis=axis),
                              data.y_val], axis=axis)

    @jax.jit
    def accuracies(params, net_state, x_eval, y_eval):
        pred = jax.vmap(predict, in_axes=(0, 0, data_axis))(params, net_state, x_eval)
        correct = pred == (y_eval[None, None] if data.shared else y_eval[:, None])  # (S, M, N)
        return correct[..., :split].mean(-1), correct[..., split:].mean(-1)

    opt_state = jax.vmap(jax.vmap(optimizer.init))(params)
    train_keys = jnp.stack([jax.random.fold_in(jax.random.key(s), 1) for s in seeds])
    history: dict[str, list] = {"loss": [], "train_acc": [], "val_acc": []}
    bar = _progress(progress, epochs, desc)
    for e in range(epochs):
        params, net_state, opt_state, losses = seed_epoch(
            params, net_state, opt_state, data.x_train, data.y_train, train_keys, e)
        train_acc, val_acc = accuracies(params, net_state, x_eval, y_eval)
        history["loss"].append(np.asarray(losses))  # (S, T, M)
        history["train_acc"].append(np.asarray(train_acc))
        history["val_acc"].append(np.asarray(val_acc))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"loss": np.concatenate(history["loss"], axis=1),
            "train_acc": np.stack(history["train_acc"], axis=1),
            "val_acc": np.stack(history["val_acc"], axis=1)}
