"""Training on optax: the functional counterpart of cs231n's ``Solver``.

- :func:`make_train_step`: one step ``(params, net_state, opt_state, batch, key) -> (params,
  net_state, opt_state, metrics)`` for any ``apply(params, state, x, *, train, key)`` (such as
  :func:`jaxbn.nets.apply_mlp`), any loss and any ``optax.GradientTransformation``. It is pure,
  so ``jax.vmap`` trains several stacked models at once with it.
- :func:`fit`: the loop. Its pieces are top-level functions, each usable alone: a
  :class:`TrainState` record (:func:`init_train_state`), the jitted epoch (:func:`make_epoch`),
  evaluation (:func:`make_predict`, :func:`evaluate`), the best-model update
  (:func:`record_epoch`), and checkpoints (:func:`save_train_state`/:func:`restore_train_state`
  on :func:`save_checkpoint`/:func:`load_checkpoint`).

Data parallelism: ``mesh=`` (a ``jax.sharding.Mesh``, on one process or spanning several started
with ``jax.distributed.initialize``) on :func:`fit`, :func:`make_train_step`, :func:`make_epoch` and
:func:`make_predict` splits every batch along its first axis over all of the mesh's devices and
replicates the parameters, the network state and the optimizer state. The step stays
``jax.jit`` of the one-device step, with sharded inputs: XLA's partitioner turns batch norm's
reductions (and the loss's mean) into all-reduces, so the statistics are those of the global
batch, no input is gathered onto one device, and dropout draws the same mask as on one device
(JAX's partitionable threefry). The numbers are the one-device run's up to float32 reassociation.
Every process passes the same global data; each transfers only its own devices' rows
(:func:`shard_batch`). Progress bars come from process 0 only.

Checkpoints never execute code on load: the arrays are stored in a ``.npz`` archive read with
``allow_pickle=False``, the rest is JSON, and the arrays are poured back into the pytree structure
that the resuming run builds itself. A file that is truncated, damaged, from another checkpoint
format, or whose tree or shapes differ from the run's raises a ``ValueError`` naming the file.
On several processes, process 0 alone writes (atomically) and the others wait until the file is
in place; every process reads it back to resume and checks that they all read the same bytes.

Shapes: ``M`` stacked models, ``N`` training examples, ``B`` batch size, ``K`` classes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbn import _checks
from jaxbn._losses import l2_penalty, softmax_cross_entropy

ApplyFn = Callable[..., tuple[jax.Array, Any]]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]
CHECKPOINT_FORMAT = "jaxbn-checkpoint"
CHECKPOINT_VERSION = 2
_META = "__meta__.json"

__all__ = ["make_train_step", "fit", "FitResult", "TrainState", "init_train_state", "make_epoch",
           "make_predict", "evaluate", "record_epoch", "save_checkpoint", "load_checkpoint",
           "save_train_state", "restore_train_state", "shard_batch"]


def make_train_step(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *,
                    reg: float = 0.0, loss_fn: LossFn = softmax_cross_entropy,
                    jit: bool = True, mesh: Mesh | None = None) -> Callable:
    """Returns ``step(params, net_state, opt_state, batch, key)``.

    The loss is ``loss_fn(scores, y)`` on ``apply_fn(params, net_state, x, train=True, key=key)``
    plus ``0.5 * reg * sum(W ** 2)`` over the weights. ``batch`` is ``(x, y)``; ``metrics`` holds
    ``loss`` and the batch ``accuracy`` (train mode, ``argmax`` of the scores against ``y``).

    Args:
      apply_fn: the model's apply function.
      optimizer: an ``optax.GradientTransformation``.
      reg: L2 regularization strength.
      loss_fn: ``(scores, labels) -> scalar``; the mean softmax cross-entropy by default.
      jit: return the step jitted (True) or plain, to compose with ``vmap``/``scan`` yourself.
      mesh: data parallelism (see the module docstring): the step jitted with ``batch`` split
        along its first axis over all of the mesh's devices and everything else replicated, in
        and out; ``B`` must be a multiple of the device count. On several processes pass the
        batch through :func:`shard_batch` (numpy inputs must be whole on one process).

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> opt = optax.sgd(0.5)
      >>> step = training.make_train_step(nets.apply_mlp, opt)
      >>> opt_state = opt.init(params)
      >>> for i in range(20):
      ...     params, state, opt_state, metrics = step(params, state, opt_state, (x, y),
      ...                                              jax.random.key(i))
      >>> float(metrics["loss"]) < 0.5, metrics["accuracy"].shape
      (True, ())
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation (e.g. "
                        f"optax.adam(1e-3)); got {type(optimizer).__name__}.")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a function (scores, labels) -> loss; got {loss_fn!r}.")
    reg = _checks.check_real("reg", reg, low=0.0)

    def step(params, net_state, opt_state, batch, key):
        x, y = batch

        def objective(params):
            scores, new_state = apply_fn(params, net_state, x, train=True, key=key)
            return loss_fn(scores, y) + l2_penalty(params, reg), (new_state, scores)

        (loss, (new_state, scores)), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(scores, -1) == y)}
        return params, new_state, opt_state, metrics

    if mesh is None:
        return jax.jit(step) if jit else step
    if not jit:
        raise ValueError("mesh= lays out the jitted step's inputs and outputs on the mesh, so it "
                         "needs jit=True; to compose the plain step yourself, pass mesh=None.")
    given, mesh = mesh, _check_mesh(mesh)
    whole, split = _replicated(mesh), _split(mesh)
    return _OnMesh(jax.jit(step, in_shardings=(whole, whole, whole, split, whole),
                           out_shardings=whole), mesh, given)


class TrainState(NamedTuple):
    """Everything :func:`fit` carries from one epoch to the next.

    Every array leaf has a leading model axis ``M`` (1 for a single model).

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> stacked = jax.tree.map(lambda a: a[None], (params, state))  # a model axis of 1
      >>> ts = training.init_train_state(*stacked, optax.sgd(0.1))
      >>> ts.epoch, ts.best_val_acc.shape, ts.history["loss"].shape
      (0, (1,), (0, 1))
    """

    params: Any
    net_state: Any
    opt_state: Any
    best_params: Any  # parameters of the epoch with the best validation accuracy so far
    best_net_state: Any
    best_val_acc: jax.Array  # (M,), -1 before the first epoch
    history: dict[str, np.ndarray]  # loss (iterations, M); train_acc, val_acc (epochs, M)
    epoch: int  # epochs completed


class FitResult(NamedTuple):
    """What :func:`fit` returns. With ``stacked=True`` every array has a leading model axis.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> result = training.fit(nets.apply_mlp, params, state, optax.sgd(0.1), (x, y),
      ...                       key=jax.random.key(2), epochs=2, batch_size=32, progress=False)
      >>> isinstance(result, training.FitResult), int(result.net_state.batch_norm[0].count)
      (True, 4)
    """

    params: Any  # final parameters
    net_state: Any  # final running statistics
    opt_state: Any
    best_params: Any  # parameters of the epoch with the best validation accuracy
    best_net_state: Any
    best_val_acc: Any
    history: dict[str, np.ndarray]  # loss (iterations,), train_acc and val_acc (epochs,)


def init_train_state(params: Any, net_state: Any,
                     optimizer: optax.GradientTransformation) -> TrainState:
    """The state before the first epoch, for stacked ``params``/``net_state`` (leading axis M).

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> two = jax.tree.map(lambda a: jax.numpy.stack([a, a]), (params, state))  # M = 2 models
      >>> ts = training.init_train_state(*two, optax.adam(1e-3))
      >>> ts.params["W1"].shape, ts.best_val_acc.tolist()  # no epoch yet: best accuracy -1
      ((2, 8, 16), [-1.0, -1.0])
    """
    num_models = jax.tree.leaves(params)[0].shape[0]
    history = {"loss": np.zeros((0, num_models), np.float32),
               "train_acc": np.zeros((0, num_models)), "val_acc": np.zeros((0, num_models))}
    return TrainState(params, net_state, jax.vmap(optimizer.init)(params), params, net_state,
                      jnp.full(num_models, -1.0), history, 0)


def make_epoch(apply_fn: ApplyFn, optimizer: optax.GradientTransformation, *, num_examples: int,
               batch_size: int, reg: float = 0.0, loss_fn: LossFn = softmax_cross_entropy,
               mesh: Mesh | None = None):
    """Returns the jitted ``epoch(params, net_state, opt_state, x, y, epoch_key)`` for stacked
    models, ending ``(params, net_state, opt_state, losses)`` with ``losses`` ``(steps, M)``.

    The permutation comes from ``fold_in(epoch_key, 0)`` and step ``i``'s dropout key is
    ``fold_in(epoch_key, i + 1)``; ``N // B`` steps (the remainder is dropped, so every step has
    one shape) run as one ``lax.scan`` of the step vmapped over the models.

    With ``mesh`` (data parallelism, see the module docstring) ``x``, ``y`` are the whole
    training set on every process's host: the same permutation is drawn, each process puts its
    devices' rows of the epoch's batches on them, and the scan runs on the mesh. ``B`` must be a
    multiple of the mesh's device count.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> opt = optax.sgd(0.1)
      >>> p, s = jax.tree.map(lambda a: a[None], (params, state))  # one stacked model
      >>> epoch = training.make_epoch(nets.apply_mlp, opt, num_examples=64, batch_size=16)
      >>> p, s, o, losses = epoch(p, s, jax.vmap(opt.init)(p), x, y, jax.random.key(3))
      >>> losses.shape  # 64 // 16 steps, 1 model
      (4, 1)
    """
    step = make_train_step(apply_fn, optimizer, reg=reg, loss_fn=loss_fn, jit=False)
    batched_step = jax.vmap(step, in_axes=(0, 0, 0, None, None))
    num_batches = num_examples // batch_size

    def scan_steps(carry, inputs, fetch, epoch_key):
        def body(carry, inputs):
            *data, i = inputs
            carry = batched_step(*carry, fetch(*data), jax.random.fold_in(epoch_key, i + 1))
            return carry[:3], carry[3]["loss"]

        carry, losses = jax.lax.scan(body, carry, (*inputs, jnp.arange(num_batches)))
        return (*carry, losses)

    if mesh is None:
        @jax.jit
        def epoch(params, net_state, opt_state, x, y, epoch_key):
            order = _epoch_order(epoch_key, num_examples, batch_size)
            return scan_steps((params, net_state, opt_state), (order,),
                              lambda idx: (x[idx], y[idx]), epoch_key)

        return epoch
    mesh = _check_mesh(mesh)
    _check_divisible("batch_size", batch_size, mesh)
    whole, split = _replicated(mesh), _split(mesh, axis=1)  # batches (steps, B, ...)
    draw = jax.jit(_epoch_order, static_argnums=(1, 2))
    scan = jax.jit(lambda carry, xs, ys, key: scan_steps(carry, (xs, ys), lambda *b: b, key),
                   in_shardings=(whole, split, split, whole), out_shardings=whole)

    def inputs(params, net_state, opt_state, x, y, epoch_key):
        order = np.asarray(draw(epoch_key, num_examples, batch_size))
        xs, ys = (_gather_rows(np.asarray(a), order, split) for a in (x, y))
        return (params, net_state, opt_state), xs, ys, epoch_key

    return _OnMesh(scan, mesh, prepare=inputs)


def _epoch_order(epoch_key: jax.Array, num_examples: int, batch_size: int) -> jax.Array:
    """The epoch's minibatches as example indices, ``(N // B, B)``."""
    num_batches = num_examples // batch_size
    order = jax.random.permutation(jax.random.fold_in(epoch_key, 0), num_examples)
    return order[:num_batches * batch_size].reshape(num_batches, batch_size)


def make_predict(apply_fn: ApplyFn, *, mesh: Mesh | None = None) -> Callable:
    """Returns jitted ``predict(params, net_state, x) -> (M, N)`` class indices in test mode.

    With ``mesh``, ``x`` (host data, the same on every process) is split over the mesh's devices
    (zero-padded to a multiple of their count: in test mode each example's scores are its own)
    and the predictions come back whole to every process, as a numpy array.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> predict = training.make_predict(nets.apply_mlp)
      >>> p, s = jax.tree.map(lambda a: a[None], (params, state))
      >>> predict(p, s, x).shape  # (M, N) class indices, test mode
      (1, 64)
    """
    def predict(params, net_state, x):
        return jax.vmap(lambda p, s: jnp.argmax(apply_fn(p, s, x, train=False)[0], -1))(
            params, net_state)

    if mesh is None:
        return jax.jit(predict)
    mesh = _check_mesh(mesh)
    whole = _replicated(mesh)
    sharded = _OnMesh(jax.jit(predict, in_shardings=(whole, whole, _split(mesh)),
                              out_shardings=whole), mesh)

    def predict_on_mesh(params, net_state, x):
        x = np.asarray(x)
        padding = np.zeros((-x.shape[0] % mesh.size, *x.shape[1:]), x.dtype)
        padded = sharded(params, net_state, shard_batch(np.concatenate([x, padding]), mesh))
        return np.asarray(padded)[:, :x.shape[0]]

    return predict_on_mesh


def evaluate(predict: Callable, params: Any, net_state: Any, x: Any, y: Any,
             batch_size: int = 1000) -> np.ndarray:
    """Accuracy ``(M,)`` of stacked models on ``(x, y)``, in batches of ``batch_size``.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> p, s = jax.tree.map(lambda a: a[None], (params, state))
      >>> acc = training.evaluate(training.make_predict(nets.apply_mlp), p, s, x, y, batch_size=16)
      >>> acc.shape, bool(0.0 <= acc[0] <= 1.0)
      ((1,), True)
    """
    correct = 0
    for start in range(0, x.shape[0], batch_size):
        pred = np.asarray(predict(params, net_state, x[start:start + batch_size]))
        correct = correct + np.sum(pred == np.asarray(y[start:start + batch_size]), axis=-1)
    return np.asarray(correct / x.shape[0], np.float64)


def record_epoch(state: TrainState, params: Any, net_state: Any, opt_state: Any,
                 losses: Any, train_acc: np.ndarray, val_acc: np.ndarray) -> TrainState:
    """The state after one more epoch: histories appended, and each model's best parameters
    replaced where its validation accuracy improved (strictly).

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> import numpy as np
      >>> p, s = jax.tree.map(lambda a: a[None], (params, state))
      >>> ts = training.init_train_state(p, s, optax.sgd(0.1))
      >>> ts = training.record_epoch(ts, p, s, ts.opt_state, np.zeros((4, 1)), np.array([0.5]),
      ...                            np.array([0.75]))
      >>> ts.epoch, ts.best_val_acc.tolist(), ts.history["val_acc"].tolist()
      (1, [0.75], [[0.75]])
    """
    improved = jnp.asarray(val_acc) > state.best_val_acc
    best_params, best_net_state = _pick_improved(improved, (params, net_state),
                                                 (state.best_params, state.best_net_state))
    history = {"loss": np.concatenate([state.history["loss"], np.asarray(losses)]),
               "train_acc": np.concatenate([state.history["train_acc"], train_acc[None]]),
               "val_acc": np.concatenate([state.history["val_acc"], val_acc[None]])}
    return TrainState(params, net_state, opt_state, best_params, best_net_state,
                      jnp.where(improved, jnp.asarray(val_acc), state.best_val_acc),
                      history, state.epoch + 1)


@jax.jit
def _pick_improved(improved: jax.Array, new: Any, old: Any) -> Any:
    """``new`` for the models that improved, ``old`` for the others (one compiled selection)."""
    def pick(a, b):
        return jnp.where(improved.reshape((-1,) + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


# ---------------------------------------------------------------------------------------------
# Data parallelism: every batch split over all of a mesh's devices, everything else replicated.


def _check_mesh(mesh: Any) -> Mesh:
    """The mesh, with auto axes: the step lays out its arrays itself, and under explicit axes
    every operation of the user's ``apply_fn`` would have to type-check its shardings."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, e.g. jax.make_mesh("
                        f"(jax.device_count(),), ('data',)); got {type(mesh).__name__}.")
    auto = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    if tuple(getattr(mesh, "axis_types", auto)) != auto:
        mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=auto)
    return mesh


def _use(mesh: Mesh) -> Any:
    """A context that makes ``mesh`` the current one (``jax.set_mesh``; JAX 0.7 spells it
    ``jax.sharding.use_mesh``)."""
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh  # type: ignore[attr-defined]
    return set_mesh(mesh)


class _OnMesh:
    """A jitted function called and lowered under its own (auto-axes) mesh, so that a mesh the
    caller has set (explicit axes, ``jax.set_mesh``) does not leak into its tracing. Arrays on
    another mesh of the same devices (the caller's) come in onto this one and go back out onto
    ``given``; ``prepare`` turns the caller's arguments into the jitted function's."""

    def __init__(self, jitted: Any, mesh: Mesh, given: Mesh | None = None,
                 prepare: Callable | None = None):
        self._jitted, self._mesh, self._given = jitted, mesh, given
        self._prepare = prepare or (lambda *args: args)

    def __call__(self, *args):
        with _use(self._mesh):
            out = self._jitted(*_move(self._prepare(*args), self._mesh))
        return out if self._given in (None, self._mesh) else _move(out, self._given)

    def lower(self, *args):
        """As a jitted function's ``lower``: for the compiled program's text and shardings."""
        with _use(self._mesh):
            return self._jitted.lower(*_move(self._prepare(*args), self._mesh))


def _move(tree: Any, mesh: Mesh) -> Any:
    """Every array laid out on another mesh (of the same devices) laid out alike on ``mesh``."""
    def move(a):
        sharding = getattr(a, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh != mesh:
            return jax.device_put(a, NamedSharding(mesh, sharding.spec))
        return a

    return jax.tree.map(move, tree)


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _split(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Array axis ``axis`` split over all of the mesh's axes together, the others whole."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), tuple(mesh.axis_names)))


def _check_divisible(name: str, size: int, mesh: Mesh) -> None:
    if size % mesh.size:
        raise ValueError(f"{name} must be a multiple of the mesh's {mesh.size} devices (each "
                         f"device takes an equal share of every batch); got {size}.")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a global batch on ``mesh``, every leaf split along its first axis over all of the
    mesh's devices (the layout ``mesh=`` steps take).

    Every process passes the same global batch (host arrays); each transfers only the rows of its
    own devices (``jax.make_array_from_callback``). Arrays that already span several processes
    are resharded as they are.

    Raises:
      ValueError: a leaf whose first axis is not a multiple of the mesh's device count.

    Example:
      >>> import jax, numpy as np
      >>> from jaxbn import training
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> x, y = training.shard_batch((np.ones((8, 3), np.float32), np.zeros(8, np.int32)), mesh)
      >>> x.shape, len(x.sharding.device_set) == jax.device_count()
      ((8, 3), True)
    """
    mesh = _check_mesh(mesh)
    sharding = _split(mesh)

    def place(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return jax.device_put(a, sharding)
        a = np.asarray(a)
        if a.ndim == 0:
            raise ValueError("shard_batch splits every array along its first axis (examples); "
                             "got a scalar.")
        _check_divisible("the batch size", a.shape[0], mesh)
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(place, batch)


def _replicate(a: Any, mesh: Mesh) -> jax.Array:
    """``a`` (the same on every process) whole on every device of the mesh."""
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, _replicated(mesh), lambda index: a[index])


def _fresh_key(key: jax.Array) -> jax.Array:
    """The same key, made anew from its bits here (not tied to a mesh the caller had set)."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(jnp.asarray(np.asarray(jax.random.key_data(key))),
                                        impl=jax.random.key_impl(key))
    return jnp.asarray(np.asarray(key))


def _gather_rows(a: np.ndarray, order: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """``a[order]`` as a global array of shape ``order.shape + a.shape[1:]``; each process
    gathers only the rows its own devices hold."""
    def rows(index):
        return a[order[index[:order.ndim]]][(slice(None),) * order.ndim + index[order.ndim:]]

    return jax.make_array_from_callback(order.shape + a.shape[1:], sharding, rows)


def _lost_peer_error(error: Exception, epoch: int, checkpoint: Any) -> RuntimeError:
    """What a process of a multi-process run says when a collective with the others failed."""
    how = (f"restart every process with fit(..., resume={os.fspath(checkpoint)!r}) to continue "
           f"from the last checkpoint, bit-identically" if checkpoint is not None else
           "no checkpoint= was given, so a restart begins from scratch")
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return RuntimeError(
        f"fit: process {jax.process_index()} of {jax.process_count()} lost contact with the "
        f"others in epoch {epoch + 1} ({first_line}); another process has most likely died, so "
        f"this one stops too. To go on, {how}.")


# ---------------------------------------------------------------------------------------------
# Checkpoints: arrays in an .npz (allow_pickle=False), the rest as JSON; no pickle anywhere.


def save_checkpoint(path: str | os.PathLike, tree: dict[str, Any],
                    metadata: dict[str, Any] | None = None) -> None:
    """Writes a dict of pytrees (and JSON-able ``metadata``) atomically: temporary file, fsync,
    rename. A crash mid-write leaves the previous checkpoint at ``path`` intact.

    On a run of several processes every process calls it (the arrays whole on each: replicated
    or process-local); process 0 alone writes, and all return once the file is in place.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxbn import training
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
      >>> training.save_checkpoint(path, {"w": jnp.arange(3.0)}, {"epoch": 7})
      >>> tree, meta = training.load_checkpoint(path, {"w": jnp.zeros(3)})
      >>> tree["w"].tolist(), meta["epoch"]
      ([0.0, 1.0, 2.0], 7)
    """
    path = os.fspath(path)
    if jax.process_index() == 0:
        _write_atomically(path, _archive(tree, metadata))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxbn checkpoint {path}")


def _archive(tree: dict[str, Any], metadata: dict[str, Any] | None) -> bytes:
    trees: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    meta = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "metadata": metadata or {}, "trees": trees}
    for name, subtree in tree.items():
        leaves, treedef = jax.tree.flatten(jax.device_get(subtree))
        leaves = [np.asarray(leaf) for leaf in leaves]
        trees[name] = {"treedef": str(treedef),
                               "shapes": [[list(a.shape), a.dtype.name] for a in leaves]}
        arrays.update({f"{name}/{i}": a for i, a in enumerate(leaves)})
    buffer = io.BytesIO()
    arrays[_META] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    savez: Any = np.savez  # numpy's stub takes any keyword for its allow_pickle flag
    savez(buffer, **arrays)
    return buffer.getvalue()


def _write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _read_archive(path: str) -> tuple[dict[str, np.ndarray], dict]:
    """Every array of the archive and its metadata; a ValueError for anything unreadable."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"checkpoint {path!r} cannot be read: it is truncated, damaged or not a "
                         f"jaxbn checkpoint ({type(e).__name__}: {e}).") from None
    if _META not in arrays:
        raise ValueError(f"checkpoint {path!r} is not a jaxbn checkpoint: it has no metadata.")
    try:
        meta = json.loads(arrays.pop(_META).tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path!r} has damaged metadata ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint {path!r} is not a jaxbn checkpoint.")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path!r} was written in checkpoint format version "
                         f"{meta.get('version')!r}; this jaxbn reads version "
                         f"{CHECKPOINT_VERSION}. Re-create it with this version of jaxbn.")
    return arrays, meta


def load_checkpoint(path: str | os.PathLike, like: dict[str, Any]) -> tuple[dict[str, Any], dict]:
    """Reads a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    ``like`` is a dict of pytrees with the structure, shapes and dtypes the caller expects (its
    values are not used). Nothing in the file is executed.

    Returns:
      ``(tree, metadata)``.

    Raises:
      ValueError: the file is truncated or damaged, not a jaxbn checkpoint, from another
        checkpoint format version, or holds other trees, shapes or dtypes than ``like``.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxbn import training
      >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.npz")
      >>> training.save_checkpoint(path, {"w": jnp.ones((2, 2))})
      >>> training.load_checkpoint(path, {"w": jnp.zeros(3)})
      Traceback (most recent call last):
      ...
      ValueError: ...
    """
    path = os.fspath(path)
    arrays, meta = _read_archive(path)
    tree = {}
    for name, subtree in like.items():
        saved = meta["trees"].get(name)
        leaves, treedef = jax.tree.flatten(subtree)
        if saved is None or saved["treedef"] != str(treedef):
            raise ValueError(
                f"checkpoint {path!r}: its {name} differ in structure from this run's (another "
                f"model architecture or optimizer?).\n  checkpoint: "
                f"{saved and saved['treedef']}\n  this run:   {treedef}")
        restored = []
        for i, (leaf, (shape, dtype)) in enumerate(zip(leaves, saved["shapes"])):
            if tuple(np.shape(leaf)) != tuple(shape) or jnp.dtype(leaf.dtype).name != dtype:
                raise ValueError(
                    f"checkpoint {path!r}: {name} leaf {i} is {dtype}{tuple(shape)} in the file "
                    f"but {jnp.dtype(leaf.dtype).name}{tuple(np.shape(leaf))} in this run.")
            restored.append(arrays[f"{name}/{i}"])
        tree[name] = jax.tree.unflatten(treedef, [jnp.asarray(a) for a in restored])
    return tree, meta["metadata"]


def save_train_state(path: str | os.PathLike, state: TrainState, fingerprint: dict, *,
                     devices: int = 1) -> None:
    """Checkpoints a :class:`TrainState`; ``fingerprint`` (JSON) identifies the run's settings,
    ``devices`` is the number of devices the batch was split over.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
      >>> ts = training.init_train_state(*jax.tree.map(lambda a: a[None], (params, state)),
      ...                                optax.sgd(0.1))
      >>> training.save_train_state(path, ts, {"lr": 0.1})
      >>> back = training.restore_train_state(path, ts, {"lr": 0.1})
      >>> bool((back.params["W1"] == ts.params["W1"]).all()), back.epoch
      (True, 0)
    """
    history = {k: v.tolist() for k, v in state.history.items()}
    save_checkpoint(path, _arrays_of(state), {"epoch": state.epoch, "fingerprint": fingerprint,
                                              "history": history, "devices": devices})


def _arrays_of(state: TrainState) -> dict[str, Any]:
    """The array parts of a state, by field name (so a mismatch names the part that differs)."""
    return {k: v for k, v in state._asdict().items() if k not in ("history", "epoch")}


def restore_train_state(path: str | os.PathLike, like: TrainState, fingerprint: dict, *,
                        devices: int = 1) -> TrainState:
    """The :class:`TrainState` saved at ``path``, poured into the structure of ``like`` (the state
    the resuming run built); a ValueError if the checkpoint comes from another run's settings.

    On several processes every process reads the file, after checking that all of them see the
    same bytes. A checkpoint written with the batch split over another number of devices than
    ``devices`` resumes from the same state with a warning: the sums of each step are then split
    differently, so the numbers may differ from an uninterrupted run in the last bits.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> import os, tempfile
      >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
      >>> ts = training.init_train_state(*jax.tree.map(lambda a: a[None], (params, state)),
      ...                                optax.sgd(0.1))
      >>> training.save_train_state(path, ts, {"lr": 0.1})
      >>> training.restore_train_state(path, ts, {"lr": 0.2})  # another run's settings
      Traceback (most recent call last):
      ...
      ValueError: ...
    """
    path = os.fspath(path)
    _check_same_file_everywhere(path)
    tree, meta = load_checkpoint(path, _arrays_of(like))
    if meta.get("fingerprint") != fingerprint:
        raise ValueError(f"checkpoint {path!r} was written by a run with other data, "
                         f"batch size, model count, key or reg: {meta.get('fingerprint')} vs "
                         f"{fingerprint}.")
    saved_devices = meta.get("devices", 1)
    if saved_devices != devices:
        warnings.warn(f"checkpoint {path!r} was written by a run on {saved_devices} device(s); "
                      f"this one has {devices}. It resumes from the same state, but each step's "
                      f"sums are split differently over the devices, so the numbers may differ "
                      f"from an uninterrupted run in the last bits.", UserWarning, stacklevel=3)
    num_models = like.best_val_acc.shape[0]
    history = {k: np.asarray(v, np.float64).reshape(-1, num_models)
               for k, v in meta["history"].items()}
    history["loss"] = history["loss"].astype(np.float32)
    return TrainState(**tree, history=history, epoch=int(meta["epoch"]))


def _check_same_file_everywhere(path: str) -> None:
    """On several processes: a ValueError unless every process reads the same file at ``path``
    (on several hosts it must be on a shared file system, or copied from process 0's)."""
    if jax.process_count() == 1:
        return
    try:
        with open(path, "rb") as f:
            digest = zlib.crc32(f.read())
    except OSError:
        digest = -1  # missing or unreadable here
    digests = _digests_everywhere(digest)
    if len(set(digests)) > 1:
        seen = ", ".join(f"process {i}: " + ("no file" if d < 0 else f"crc {d:08x}")
                         for i, d in enumerate(digests))
        raise ValueError(f"checkpoint {path!r}: the processes of this run read different files "
                         f"({seen}). Every process must read the file process 0 wrote: put it "
                         f"on a file system they share, or copy it to each host.")


def _check_same_data_everywhere(sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """On several processes: a ValueError unless every process passed fit the same data (each
    puts only its own devices' rows of every batch on them, so other data would mix silently)."""
    if jax.process_count() == 1:
        return
    for name, arrays in sets.items():
        digest = 0
        for a in arrays:
            digest = zlib.crc32(np.ascontiguousarray(a).tobytes(), digest)
        digests = _digests_everywhere(digest)
        if len(set(digests)) > 1:
            seen = ", ".join(f"process {i}: crc {d:08x}" for i, d in enumerate(digests))
            raise ValueError(f"fit: the processes of this run were given different {name} "
                             f"({seen}). Every process passes the same global data set; each "
                             f"puts only its own devices' rows of every batch on them.")


def _digests_everywhere(digest: int) -> list[int]:
    """Every process's 32-bit ``digest`` (-1 for none), in process order."""
    mine = np.array([digest >> 16, digest & 0xFFFF] if digest >= 0 else [-1, -1], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 2)
    return [-1 if hi < 0 else hi << 16 | lo for hi, lo in everyone.tolist()]


# ---------------------------------------------------------------------------------------------
# fit


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


def _check_fit(apply_fn, params, net_state, train_data, val_data, options) -> dict:
    """Validates fit's data and options; returns the data sets by name."""
    sets = {"train_data": _check_data("train_data", train_data)}
    x_train = sets["train_data"][0]
    for name in ("epochs", "batch_size", "checkpoint_every", "eval_batch_size"):
        _checks.check_positive_int(name, options[name])
    if options["batch_size"] > x_train.shape[0]:
        raise ValueError(f"batch_size must be at most the number of training examples "
                         f"({x_train.shape[0]}); got {options['batch_size']}.")
    scores = jax.eval_shape(lambda p, s, x: apply_fn(_unstack(p), _unstack(s), x, train=False)[0],
                            params, net_state, x_train[:1])
    num_classes = scores.shape[-1]
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
    return sets


def _stack(tree):
    return jax.tree.map(lambda a: jnp.asarray(a)[None], tree)


def _unstack(tree):
    return jax.tree.map(lambda a: a[0], tree)


def _fingerprint(key, num_examples, batch_size, num_models, reg) -> dict:
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    return {"n": num_examples, "batch_size": batch_size, "num_models": num_models,
            "key": np.asarray(key_data).tolist(), "reg": float(reg)}


def _progress(enabled: bool | None, total: int, desc: str | None, initial: int = 0):
    if jax.process_index() != 0:  # one bar for a run of several processes
        return None
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is an optional extra
        return None
    return tqdm(total=total, desc=desc, unit="epoch", leave=False, initial=initial)


def _show(bar, state: TrainState) -> None:
    if bar is not None:
        bar.set_postfix(loss=f"{float(np.mean(state.history['loss'][-1])):.4f}",
                        train_acc=f"{float(np.mean(state.history['train_acc'][-1])):.3f}",
                        val_acc=f"{float(np.mean(state.history['val_acc'][-1])):.3f}")
        bar.update(1)


def _result(state: TrainState, stacked: bool) -> FitResult:
    result = FitResult(state.params, state.net_state, state.opt_state, state.best_params,
                       state.best_net_state, state.best_val_acc, state.history)
    if stacked:
        return result
    return result._replace(**{f: _unstack(getattr(result, f)) for f in FitResult._fields[:6]},
                           history={k: v[:, 0] for k, v in state.history.items()})


def fit(apply_fn: ApplyFn, params: Any, net_state: Any, optimizer: optax.GradientTransformation,
        train_data: tuple[Any, Any], *, key: jax.Array, epochs: int = 10, batch_size: int = 100,
        reg: float = 0.0, val_data: tuple[Any, Any] | None = None, num_train_eval: int = 1000,
        eval_batch_size: int = 1000, stacked: bool = False, progress: bool | None = None,
        desc: str | None = None, checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 1, resume: str | os.PathLike | None = None,
        loss_fn: LossFn = softmax_cross_entropy, mesh: Mesh | None = None) -> FitResult:
    """Trains ``apply_fn``'s model with ``optimizer`` over epochs of shuffled minibatches.

    Epoch ``e`` runs :func:`make_epoch`'s jitted scan with key ``fold_in(key, e)``. After each
    epoch the model is evaluated in test mode (running statistics, no dropout) on the first
    ``num_train_eval`` training examples and on ``val_data``, and the best model is kept.

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
      progress: tqdm bar (process 0's only); None (default) shows it when stderr is a terminal.
      checkpoint: path of a checkpoint written atomically every ``checkpoint_every`` epochs and
        after the last one (no pickle: see the module docstring; process 0 writes it).
      resume: path of a checkpoint to continue from; the result is bit-identical to a run that was
        never interrupted, on the same number of devices (on another, a warning says that the
        last bits may differ).
      loss_fn: ``(scores, labels) -> loss``, softmax cross-entropy by default.
      mesh: a ``jax.sharding.Mesh`` to train data-parallel on (see the module docstring): every
        batch split over all of its devices (``batch_size`` a multiple of their count),
        statistics and gradients of the global batch, state replicated; evaluation is split the
        same way. On several processes (``jax.distributed.initialize``) every process calls fit
        with the same arguments and data; if another process dies, the others raise a
        RuntimeError that says how to resume. Works with ``stacked``.

    Returns:
      A :class:`FitResult`.

    Raises:
      TypeError/ValueError: malformed data, labels out of range, ``batch_size`` larger than the data
      set (or not a multiple of the mesh's devices), bad options, a checkpoint that is damaged or
      from another run, model or optimizer.
      RuntimeError: on several processes, contact with another process was lost.

    Example:
      >>> import jax, optax
      >>> from jaxbn import nets, training
      >>> x = jax.random.normal(jax.random.key(0), (64, 8))
      >>> y = (x[:, 0] > 0).astype(int)  # two classes
      >>> params, state = nets.init_mlp(jax.random.key(1), 8, [16], 2, normalization="batchnorm",
      ...                               weight_scale=0.1)
      >>> result = training.fit(nets.apply_mlp, params, state, optax.adam(1e-2), (x, y),
      ...                       key=jax.random.key(2), epochs=3, batch_size=16, progress=False)
      >>> result.history["loss"].shape, result.history["val_acc"].shape  # 4 steps per epoch
      ((12,), (3,))
      >>> bool(result.history["loss"][-1] < result.history["loss"][0])
      True
    """
    options = dict(epochs=epochs, batch_size=batch_size, checkpoint_every=checkpoint_every,
                   eval_batch_size=eval_batch_size)
    if not stacked:
        params, net_state = _stack(params), _stack(net_state)
    sets = _check_fit(apply_fn, params, net_state, train_data, val_data, options)
    devices = 1
    given_mesh = mesh
    if mesh is not None:  # the data stays on the host: each epoch places its batches
        mesh = _check_mesh(mesh)
        devices = mesh.size
        sets = {name: tuple(np.asarray(a) for a in data) for name, data in sets.items()}
    (x, y), n = sets["train_data"], sets["train_data"][0].shape[0]
    evaluation = [(x[:num_train_eval], y[:num_train_eval]), sets.get("val_data")]
    run_epoch = make_epoch(apply_fn, optimizer, num_examples=n, batch_size=batch_size, reg=reg,
                           loss_fn=loss_fn, mesh=mesh)
    predict = make_predict(apply_fn, mesh=mesh)
    state = init_train_state(params, net_state, optimizer)
    fingerprint = _fingerprint(key, n, batch_size, state.best_val_acc.shape[0], reg)
    # Under fit's own (auto-axes) mesh, whatever mesh the caller has set.
    with contextlib.nullcontext() if mesh is None else _use(mesh):
        if mesh is not None:
            _check_same_data_everywhere(sets)
        if resume is not None:
            state = restore_train_state(resume, state, fingerprint, devices=devices)
        if mesh is not None:  # on the mesh from the start, so the epoch compiles once
            state = state._replace(**jax.tree.map(lambda a: _replicate(a, mesh),
                                                  _arrays_of(state)))
            key = _fresh_key(key)
        bar = _progress(progress, epochs, desc, initial=state.epoch)
        try:
            while state.epoch < epochs:
                params, net_state, opt_state, losses = run_epoch(
                    state.params, state.net_state, state.opt_state, x, y,
                    jax.random.fold_in(key, state.epoch))
                acc = [evaluate(predict, params, net_state, data[0], data[1], eval_batch_size)
                       for data in evaluation if data is not None]
                state = record_epoch(state, params, net_state, opt_state, losses, acc[0],
                                     acc[-1])
                _show(bar, state)
                if checkpoint is not None and (state.epoch % checkpoint_every == 0
                                               or state.epoch == epochs):
                    save_train_state(checkpoint, state, fingerprint, devices=devices)
        except jax.errors.JaxRuntimeError as error:
            if jax.process_count() == 1:
                raise
            raise _lost_peer_error(error, state.epoch, checkpoint) from error
        finally:
            if bar is not None:
                bar.close()
        result = _result(state, stacked)
    if given_mesh is None:
        return result
    # On the caller's mesh (the histories are numpy: left out of the move).
    return _move(result._replace(history={}), given_mesh)._replace(history=result.history)
