"""Equinox layers computed by jaxbn: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``Dropout``.

Each is a subclass of the ``equinox.nn`` layer of the same name, with its fields, constructor
arguments and call convention: per-example calls, ``(out, state)`` with ``eqx.nn.State``
(``eqx.nn.make_with_state``), and for ``BatchNorm`` a ``jax.vmap``/``eqx.filter_vmap`` with a
matching ``axis_name`` around the call (unbound, it raises JAX's ``NameError``, as Equinox's
layer does; inference needs no bound axis). They work in ``eqx.nn.Sequential``, under
``eqx.filter_jit`` and ``eqx.filter_vmap``, with batches of one and under
``jax.numpy_dtype_promotion("strict")``. Replacing ``eqx.nn.BatchNorm(..., mode="batch")`` by
``jaxbn.equinox.BatchNorm(...)`` changes no other line; the model's leaves, and so its
serialised checkpoints, are the same. ``backward`` is an extra keyword-only option (see
:func:`jaxbn.batch_norm`). Install with ``pip install 'jaxbn[equinox]'``.

Differences from Equinox, on purpose (these and no others):
  * ``BatchNorm`` implements ``mode="batch"`` (the default here): training normalizes with the
    batch statistics, as the paper, PyTorch and Flax do. Equinox's ``mode="ema"`` (its legacy
    default) normalizes training batches with the running averages instead:
    ``BatchNorm(4, "batch", mode="ema")`` raises ``ValueError``.
  * Inference debiasing. Equinox keeps ``hidden = momentum * hidden + (1 - momentum) * batch``
    from ``hidden_mean = 0``, ``hidden_var = 1`` and reads ``hidden / (1 - momentum**t)`` after
    ``t`` batches. That divides the initial 1 of the variance too: after one batch with
    momentum 0.99 the variance it normalizes with is ``99 + var`` (equinox issue #659 and
    follow-ups). Here the state is the same, and the read-out removes the initial value's share:
    ``var = (hidden_var - momentum**t) / (1 - momentum**t)``, exactly the normalized weighted
    average of the batch variances seen (the mean is unchanged, its initial value being 0).
  * ``BatchNorm`` computes its statistics in float32 for bfloat16/float16 x (Equinox's in x's
    dtype): on bfloat16 data of std 0.1 at offset 30, Equinox's outputs are off by more than 1,
    jaxbn's by less than 0.01.
  * ``Dropout`` with ``p=1`` gives zero outputs *and* zero gradients (Equinox's are NaN).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from jaxbn import _adapter
from jaxbn._batch_norm import BatchNormState, batch_norm, check_axis_name
from jaxbn._dropout import bernoulli_dropout
from jaxbn._layer_norm import layer_norm, normalize_over

if TYPE_CHECKING:
    import equinox as eqx
else:  # an ImportError that names the extra to install
    eqx = _adapter.require("equinox", "equinox")

__all__ = ["BatchNorm", "Dropout", "GroupNorm", "LayerNorm", "debiased_statistics"]

_sentinel = object()


def _with_state(out, state):
    return out if state is _sentinel else (out, state)


def debiased_statistics(hidden_mean, hidden_var, count, momentum):
    r"""The running statistics an Equinox ``mode="batch"`` state stands for.

    With ``w = momentum ** count`` and the initial values 0 (mean) and 1 (variance),
    ``hidden = w * initial + (1 - momentum) * sum_k momentum**(count - k) * batch_k``, so the
    normalized average of the batches is ``(hidden - w * initial) / (1 - w)``. Before any batch
    (``count == 0``) it is the initial ``(0, 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxbn.equinox as bn
      >>> # one batch of mean 2 and variance 3 at momentum 0.9: hidden = 0.9 * initial + 0.1 * batch
      >>> mean, var = bn.debiased_statistics(jnp.float32(0.2), jnp.float32(0.9 + 0.3), 1, 0.9)
      >>> round(float(mean), 5), round(float(var), 5)  # the batch's own statistics
      (2.0, 3.0)
    """
    w = jnp.asarray(momentum, hidden_mean.dtype) ** count
    seen = count > 0
    denominator = jnp.where(seen, 1 - w, 1)
    mean = jnp.where(seen, hidden_mean / denominator, hidden_mean)
    var = jnp.where(seen, (hidden_var - w) / denominator, hidden_var)
    return mean, var


class BatchNorm(eqx.nn.BatchNorm):
    """``equinox.nn.BatchNorm`` (``mode="batch"``) with jaxbn's computation: see the module
    docstring. ``x`` is one example, ``(input_size, *spatial)``, under a vmap named
    ``axis_name``.

    Example:
      >>> import equinox as eqx, jax, jax.numpy as jnp
      >>> import jaxbn.equinox as bn
      >>> norm, state = eqx.nn.make_with_state(bn.BatchNorm)(3, "batch")
      >>> x = 2.0 * jax.random.normal(jax.random.key(0), (16, 3)) + 1.0  # 16 examples
      >>> y, state = jax.vmap(norm, axis_name="batch", in_axes=(0, None),
      ...                     out_axes=(0, None))(x, state)
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(y.std(0), 1, atol=1e-3))
      (True, True)
    """

    backward: str = eqx.field(static=True)

    def __init__(self, input_size: int, axis_name: Any, eps: float = 1e-5,
                 channelwise_affine: bool = True, momentum: float = 0.99,
                 inference: bool = False, dtype=None, mode: str = "batch", *,
                 backward: str = "alt"):
        if mode != "batch":
            raise ValueError(f"jaxbn.equinox.BatchNorm implements mode='batch' (training "
                             f"normalizes with the batch statistics); got mode={mode!r}. "
                             f"Equinox's 'ema'/'legacy' mode normalizes training batches with "
                             f"the running averages: use eqx.nn.BatchNorm for it.")
        super().__init__(input_size, axis_name, eps, channelwise_affine, momentum, inference,
                         dtype, "batch")
        self.backward = backward

    def __call__(self, x, state, *, key=None, inference: bool | None = None):
        frozen = _adapter.choose("inference", inference, self.inference, "pass inference=...")
        if not frozen:  # as Equinox's layer: an unbound axis name first, then the shape
            check_axis_name(self.axis_name)
        if x.shape[:1] != (self.input_size,):
            raise ValueError(
                f"BatchNorm(input_size={self.input_size}) takes one example of shape "
                f"({self.input_size}, ...); got x of shape {tuple(x.shape)}. Equinox layers are "
                f"called per example: for a batch use jax.vmap(norm, axis_name="
                f"{self.axis_name!r}, in_axes=(0, None), out_axes=(0, None))(x, state).")
        count = state.get(self.batch_counter)
        hidden_mean, hidden_var = state.get(self.batch_state_index)
        stats = (debiased_statistics(hidden_mean, hidden_var, count, self.momentum) if frozen
                 else (hidden_mean, hidden_var))
        # Equinox takes a batch of one (variance 0) and needs the axis bound only in training.
        y, new = batch_norm(x[None], self.weight, self.bias, BatchNormState(*stats),
                            train=not frozen, momentum=self.momentum, eps=self.eps, axis=1,
                            axis_name=None if frozen else self.axis_name,
                            backward=self.backward, allow_one_value=True)
        if not frozen:
            state = state.set(self.batch_counter, count + 1)
            state = state.set(self.batch_state_index,
                              (new.mean.astype(hidden_mean.dtype),
                               new.var.astype(hidden_var.dtype)))
        return y[0], state


class LayerNorm(eqx.nn.LayerNorm):
    """``equinox.nn.LayerNorm`` with jaxbn's computation over all of ``x`` (shape ``shape``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn.equinox as bn
      >>> norm = bn.LayerNorm((4, 8))
      >>> y = jax.vmap(norm)(3.0 + jax.random.normal(jax.random.key(0), (2, 4, 8)))  # a batch of 2
      >>> bool(jnp.allclose(y.mean((1, 2)), 0, atol=1e-6))
      True
      >>> bool(jnp.allclose(y.std((1, 2)), 1, atol=1e-3))
      True
    """

    backward: str = eqx.field(static=True)

    def __init__(self, shape, eps: float = 1e-5, use_weight: bool = True, use_bias: bool = True,
                 dtype=None, *, elementwise_affine: bool | None = None, backward: str = "alt"):
        super().__init__(shape, eps, use_weight, use_bias, dtype,
                         elementwise_affine=elementwise_affine)
        self.backward = backward

    def __call__(self, x, state=_sentinel, *, key=None):
        if x.shape != self.shape:
            raise ValueError(f"LayerNorm(shape)(x) needs x.shape == shape: got shape="
                             f"{self.shape} and x.shape={x.shape}. For a batch, call it under "
                             f"jax.vmap.")
        out = layer_norm(x, self.weight, self.bias, eps=self.eps, backward=self.backward,
                         normalized_ndim=max(len(self.shape), 1))
        return _with_state(out, state)


class GroupNorm(eqx.nn.GroupNorm):
    """``equinox.nn.GroupNorm`` with jaxbn's computation; ``x`` is ``(channels, *spatial)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn.equinox as bn
      >>> x = jax.random.normal(jax.random.key(0), (6, 4, 4))  # one example: (C, H, W)
      >>> y = bn.GroupNorm(groups=3, channels=6)(x)
      >>> bool(jnp.allclose(y.reshape(3, -1).mean(1), 0, atol=1e-6))  # per group of 2 channels
      True
    """

    backward: str = eqx.field(static=True)

    def __init__(self, groups: int, channels: int | None = None, eps: float = 1e-5,
                 channelwise_affine: bool = True, dtype=None, *, backward: str = "alt"):
        super().__init__(groups, channels, eps, channelwise_affine, dtype)
        self.backward = backward

    def __call__(self, x, state=_sentinel, *, key=None):
        # One example, channels first: each group over its channels and every other axis.
        out = normalize_over(x, self.weight, self.bias, axes=tuple(range(1, x.ndim)),
                             param_axes=0, groups=self.groups, eps=self.eps,
                             backward=self.backward)
        return _with_state(out, state)


class Dropout(eqx.nn.Dropout):
    """``equinox.nn.Dropout``: the same key drops the same entries as Equinox's
    (``jax.random.bernoulli``), and the backward keeps a bit-packed mask.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxbn.equinox as bn
      >>> y = bn.Dropout(p=0.5)(jnp.ones(1000), key=jax.random.key(0))
      >>> sorted(set(y.tolist())), 400 < int((y == 0).sum()) < 600  # kept entries scaled by 1 / 0.5
      ([0.0, 2.0], True)
      >>> bool((bn.Dropout(p=0.5, inference=True)(jnp.ones(3)) == 1).all())  # no key needed
      True
    """

    def __call__(self, x, *, key=None, inference: bool | None = None,
                 deterministic: bool | None = None):
        frozen = _adapter.choose("inference", inference if deterministic is None
                                 else deterministic, self.inference, "pass inference=...")
        if frozen:
            return x
        if key is None and not (isinstance(self.p, (int, float)) and self.p == 0):
            raise RuntimeError("Dropout requires a key when running in non-deterministic mode.")
        return bernoulli_dropout(key, x, rate=self.p)
