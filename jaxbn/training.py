"""Training on optax: the functional counterpart of cs231n's ``Solver``.

- :func:`make_train_step`: one step ``(params, net_state, opt_state, batch, key) -> (params,
  net_state, opt_state, metrics)`` for any ``apply(params, state, x, *, train, key)`` (such as
  :func:`jaxbn.nets.apply_mlp`) and any ``optax.GradientTransformation`` (sgd, momentum, rmsprop,
  adam, schedules such as per-epoch decay all come from optax). It is pure, so ``jax.vmap`` trains
  several stacked models at once with it.
- :func:`fit`: epochs of minibatches drawn with explicit keys, loss per iteration, train/validation
  accuracy per epoch in test mode, the best-validation parameters kept, a tqdm progress bar, atomic
  checkpoints and bit-identical resumption.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbn import _checks
from jaxbn.nets import l2_penalty, softmax_cross_entropy

ApplyFn = Callable[..., tuple[jax.Array, Any]]
CHECKPOINT_VERSION = 1


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *,
                    reg: float = 0.0, jit: bool = True) -> Callable:
    """Returns ``step(params, net_state, opt_state, batch, key)``.

    The loss is the mean softmax cross-entropy of ``apply_fn(params, net_state, x, train=True,
    key=key)`` plus ``0.5 * reg * sum(W ** 2)`` over the weights. ``batch`` is ``(x, y)`` with
    integer labels ``y``; ``metrics`` holds ``loss`` and the batch ``accuracy`` (train mode).

    Args:
      apply_fn: the model's apply function.
      optimizer: an ``optax.GradientTransformation``.
      reg: L2 regularization strength.
      jit: return the step jitted (True) or plain, to compose with ``vmap``/``scan`` yourself.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. optax.adam(1e-3));"
                        f" got {type(optimizer).__name__}.")
    reg = _checks.check_real("reg", reg, low=0.0)

    def step(params, net_state, opt_state, batch, key):
        x, y = batch

        def objective(params):
            scores, new_state = apply_fn(params, net_state, x, train=True, key=key)
            loss = softmax_cross_entropy(scores, y) + l2_penalty(params, reg)
            return loss, (new_state, scores)

        (loss, (new_state, scores)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(scores, -1) == y)}
        return params, new_state, opt_state, metrics

    return jax.jit(step) if jit else step


class FitResult(NamedTuple):
    """What :func:`fit` returns. With ``stacked=True`` every array has a leading model axis."""

    params: Any  # final parameters
    net_state: Any  # final running statistics
    opt_state: Any
    best_params: Any  # parameters of the epoch with the best validation accuracy
    best_net_state: Any
    best_val_acc: Any
    history: dict[str, np.ndarray]  # loss (iterations,), train_acc and val_acc (epochs,)


def _check_data(name: str, data: Any) -> tuple[jax.Array, jax.Array]:
    try:
        x, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (x, y) of arrays; got {type(data).__name__}.") \
            from None
    x = _checks.check_float_array(f"{name} x", np.asarray(x) if not hasattr(x, "dtype") else x)
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer) or y.ndim != 1:
        raise TypeError(f"{name} labels must be a 1-D integer array; got dtype {y.dtype} and shape "
                        f"{tuple(y.shape)}.")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} x and labels must have the same number of examples; got "
                         f"{x.shape[0]} and {y.shape[0]}.")
    return x, y


def _stack(tree):
    return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _unstack(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _key_data(key) -> tuple[np.ndarray, bool]:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(key)), True
    return np.asarray(key), False


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Writes ``payload`` (a dict of pytrees) atomically: a temporary file, fsync, then rename.

    A crash mid-write leaves the previous checkpoint at ``path`` intact.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(jax.device_get(payload), f, protocol=pickle.HIGHEST_PROTOCOL)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Reads a checkpoint written by :func:`save_checkpoint` (a file you trust: it is a pickle)."""
    with open(path, "rb") as f:
        payload = pickle.load(f)
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"resume: {os.fspath(path)!r} is not a jaxbn checkpoint.")
    return payload


def _progress(enabled: bool | None, total: int, desc: str | None):
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False)


def fit(apply_fn: ApplyFn, params: Any, net_state: Any, optimizer: optax.GradientTransformation,
        train_data: tuple[Any, Any], *, key: jax.Array, epochs: int = 10, batch_size: int = 100,
        reg: float = 0.0, val_data: tuple[Any, Any] | None = None, num_train_eval: int = 1000,
        eval_batch_size: int = 1000, stacked: bool = False, progress: bool | None = None,
        desc: str | None = None, checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1, resume: str | os.PathLike | None = None) -> FitResult:
    """Trains ``apply_fn``'s model with ``optimizer`` over epochs of shuffled minibatches.

    Each epoch draws a permutation from ``fold_in(key, epoch)`` and visits ``N // batch_size``
    minibatches (the remainder is dropped, so every step has one shape); the dropout key of step
    ``i`` is ``fold_in(fold_in(key, epoch), i + 1)``. A whole epoch runs as one jitted ``lax.scan``.
    After each epoch the model is evaluated in test mode (running statistics, no dropout) on the
    first ``num_train_eval`` training examples and on ``val_data``, in batches.

    Args:
      apply_fn: ``apply(params, state, x, *, train, key) -> (scores, new_state)``.
      params, net_state: the model's initial parameters and state (a leading model axis when
        ``stacked``).
      optimizer: an ``optax.GradientTransformation``; per-epoch decay is an optax schedule with
        ``transition_steps = N // batch_size`` and ``staircase=True``.
      train_data: ``(x, y)`` with integer labels.
      key: PRNG key for shuffling and dropout.
      epochs, batch_size, reg: as in cs231n's Solver (reg is the L2 strength).
      val_data: ``(x, y)`` for validation accuracy and best-model selection (train accuracy is
        used when absent).
      stacked: params/state carry a leading axis of independent models trained together with
        ``jax.vmap`` on the same minibatches; histories then have a trailing model axis.
      progress: tqdm bar; None (default) shows it when stderr is a terminal.
      checkpoint: path of a checkpoint written atomically every ``checkpoint_every`` epochs and
        after the last one.
      resume: path of a checkpoint to continue from; the result is bit-identical to a run that was
        never interrupted.

    Returns:
      A :class:`FitResult`.

    Raises:
      TypeError/ValueError: malformed data, labels out of range, ``batch_size`` larger than the data
      set, bad options, a checkpoint from another configuration.
    """
    x_train, y_train = _check_data("train_data", train_data)
    n = x_train.shape[0]
    for name, value in (("epochs", epochs), ("batch_size", batch_size),
                        ("checkpoint_every", checkpoint_every),
                        ("eval_batch_size", eval_batch_size)):
        _checks.check_positive_int(name, value)
    if batch_size > n:
        raise ValueError(f"batch_size must be at most the number of training examples ({n}); "
                         f"got {batch_size}.")
    if not stacked:
        params, net_state = _stack(params), _stack(net_state)
    num_models = jax.tree.leaves(params)[0].shape[0]
    scores = jax.eval_shape(lambda p, s, x: apply_fn(_unstack(p), _unstack(s), x, train=False)[0],
                            params, net_state, x_train[:1])
    num_classes = scores.shape[-1]
    sets = {"train_data": (x_train, y_train)}
    if val_data is not None:
        sets["val_data"] = _check_data("val_data", val_data)
        if sets["val_data"][0].shape[1:] != x_train.shape[1:]:
            raise ValueError(f"val_data x must have examples of shape {tuple(x_train.shape[1:])} "
                             f"like train_data; got {tuple(sets['val_data'][0].shape[1:])}.")
    for name, (_, labels) in sets.items():
        low, high = int(jnp.min(labels)), int(jnp.max(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} labels must be in [0, {num_classes}) for a model with "
                             f"{num_classes} classes; got values in [{low}, {high}].")

    step = make_train_step(apply_fn, optimizer, reg=reg, jit=False)
    batched_step = jax.vmap(step, in_axes=(0, 0, 0, None, None))
    num_batches = n // batch_size

    @jax.jit
    def run_epoch(params, net_state, opt_state, x, y, epoch_key):
        order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), n)
        order = order[:num_batches * batch_size].reshape(num_batches, batch_size)

        def body(carry, inputs):
            idx, i = inputs
            carry = batched_step(*carry, (x[idx], y[idx]), jax.random.fold_in(epoch_key, i + 1))
            return carry[:3], carry[3]

        carry, metrics = jax.lax.scan(body, (params, net_state, opt_state),
                                      (order, jnp.arange(num_batches)))
        return (*carry, metrics["loss"])

    @jax.jit
    def predict(params, net_state, x):
        return jax.vmap(lambda p, s: jnp.argmax(apply_fn(p, s, x, train=False)[0], -1))(
            params, net_state)

    def accuracy(params, net_state, x, y):
        correct = np.zeros(num_models)
        for start in range(0, x.shape[0], eval_batch_size):
            pred = predict(params, net_state, x[start:start + eval_batch_size])
            correct += np.asarray(jnp.sum(pred == y[start:start + eval_batch_size], axis=-1))
        return correct / x.shape[0]

    key_data, typed_key = _key_data(key)
    fingerprint = {"n": n, "batch_size": batch_size, "num_models": num_models,
                   "key": key_data.tolist(), "reg": float(reg)}
    if resume is not None:
        saved = load_checkpoint(resume)
        if saved["fingerprint"] != fingerprint:
            raise ValueError(f"resume: the checkpoint {os.fspath(resume)!r} was written by a run "
                             f"with other data, batch size, model count, key or reg: "
                             f"{saved['fingerprint']} vs {fingerprint}.")
        params, net_state, opt_state = saved["params"], saved["net_state"], saved["opt_state"]
        best = saved["best"]
        history = saved["history"]
        start_epoch = saved["epoch"]
        params, net_state, opt_state, best = jax.tree.map(jnp.asarray,
                                                          (params, net_state, opt_state, best))
    else:
        opt_state = jax.vmap(optimizer.init)(params)
        best = {"params": params, "net_state": net_state, "val_acc": jnp.full(num_models, -1.0)}
        history = {"loss": [], "train_acc": [], "val_acc": []}
        start_epoch = 0

    x_eval, y_eval = x_train[:num_train_eval], y_train[:num_train_eval]
    bar = _progress(progress, epochs, desc)
    if bar is not None:
        bar.update(start_epoch)
    try:
        for epoch in range(start_epoch, epochs):
            params, net_state, opt_state, losses = run_epoch(
                params, net_state, opt_state, x_train, y_train, jax.random.fold_in(key, epoch))
            train_acc = accuracy(params, net_state, x_eval, y_eval)
            val_acc = (accuracy(params, net_state, *sets["val_data"]) if val_data is not None
                       else train_acc)
            history["loss"].append(np.asarray(losses))
            history["train_acc"].append(train_acc)
            history["val_acc"].append(val_acc)
            improved = jnp.asarray(val_acc) > best["val_acc"]
            pick = lambda new, old: jnp.where(improved.reshape((-1,) + (1,) * (new.ndim - 1)),
                                              new, old)
            best = {"params": jax.tree.map(pick, params, best["params"]),
                    "net_state": jax.tree.map(pick, net_state, best["net_state"]),
                    "val_acc": jnp.where(improved, jnp.asarray(val_acc), best["val_acc"])}
            if bar is not None:
                bar.set_postfix(loss=f"{float(np.mean(losses[-1])):.4f}",
                                train_acc=f"{float(np.mean(train_acc)):.3f}",
                                val_acc=f"{float(np.mean(val_acc)):.3f}")
                bar.update(1)
            done = epoch + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == epochs):
                save_checkpoint(checkpoint, {
                    "version": CHECKPOINT_VERSION, "epoch": done, "fingerprint": fingerprint,
                    "key": key_data, "typed_key": typed_key, "step": done * num_batches,
                    "params": params, "net_state": net_state, "opt_state": opt_state,
                    "best": best, "history": history})
    finally:
        if bar is not None:
            bar.close()

    hist = {"loss": (np.concatenate(history["loss"]) if history["loss"]
                     else np.zeros((0, num_models))),
            "train_acc": np.asarray(history["train_acc"]).reshape(-1, num_models),
            "val_acc": np.asarray(history["val_acc"]).reshape(-1, num_models)}
    result = FitResult(params, net_state, opt_state, best["params"], best["net_state"],
                       best["val_acc"], hist)
    if stacked:
        return result
    return FitResult(*(_unstack(t) for t in result[:6]),
                     {k: v[:, 0] for k, v in hist.items()})
