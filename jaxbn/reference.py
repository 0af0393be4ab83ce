"""Naive forwards in plain ``jnp``: the ground truth the hand-written rules are tested against.

Nothing here has a custom derivative: differentiating these functions with JAX gives the exact
gradients the ``custom_vjp`` rules in jaxbn must reproduce. ``backward="autodiff"`` runs them too.
They take the same arguments as the public functions but skip their argument checks.

This module is the oracle, so it imports nothing from jaxbn: every helper it needs (sums, counts,
the group-norm reshape, the statistics dtype) is written here again on purpose. A helper shared
with the implementation would hide a bug that both then have.

Shape legend: ``N`` batch, ``D`` features, ``C, H, W`` channels, height, width, ``G`` groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["normalize", "batch_norm_train", "batch_norm_test", "layer_norm", "group_norm",
           "dropout", "bernoulli_dropout", "batch_renorm_train"]


def _float_dtype(*dtypes: Any) -> Any:
    """float32 statistics for float16/bfloat16/float32 data, float64 for float64 data."""
    return jnp.promote_types(jnp.float32, jnp.result_type(*dtypes))


def _psum(a: jax.Array, axis_name: Any) -> jax.Array:
    """``psum`` over a mapped axis; ``axis_name`` may carry ``.name`` and ``.groups`` (device
    subgroups, ``axis_index_groups``)."""
    if axis_name is None:
        return a
    if hasattr(axis_name, "groups"):
        return jax.lax.psum(a, axis_name.name, axis_index_groups=axis_name.groups)
    return jax.lax.psum(a, axis_name)


def normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array, stat_axes: Sequence[int],
              eps: float, axis_name: Any = None,
              mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with statistics over ``stat_axes``.

    ``gamma`` and ``beta`` are already shaped to broadcast against ``x``. The statistics are taken
    in float32 (float64 for float64 data), the variance by two passes, and combined over the mapped
    axes ``axis_name`` when given. ``mask`` (boolean, broadcastable to ``x``) selects the valid
    entries: the others are replaced by 0 before any arithmetic (so NaN or inf there cannot leak),
    count for nothing, and give output 0. No valid entry gives mean 0 and variance 0.

    Returns:
      ``(y, mean, var)``: ``y`` in ``x.dtype``; ``mean`` and ``var`` (biased) keep the reduced axes
      as size 1.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import reference
      >>> x = jnp.array([[1.0], [3.0]])
      >>> y, mean, var = reference.normalize(x, jnp.ones((1, 1)), jnp.zeros((1, 1)), (0,), 0.0)
      >>> y.tolist(), mean.tolist(), var.tolist()
      ([[-1.0], [1.0]], [[2.0]], [[1.0]])
    """
    dtype = _float_dtype(x.dtype, gamma.dtype, beta.dtype)
    real = jnp.finfo(dtype).dtype  # the counts' and the variance's dtype
    axes = tuple(stat_axes)
    xs = x.astype(dtype)
    if mask is None:
        valid = jnp.ones(xs.shape, bool)
    else:
        valid = jnp.broadcast_to(mask, xs.shape)
        xs = jnp.where(valid, xs, 0)
    count = _psum(jnp.sum(valid.astype(real), axes, keepdims=True), axis_name)
    count = jnp.maximum(count, 1)
    mean = _psum(jnp.sum(xs, axes, keepdims=True), axis_name) / count
    centered = jnp.where(valid, xs - mean, 0)
    squares = jnp.real(centered * jnp.conj(centered))
    var = _psum(jnp.sum(squares, axes, keepdims=True), axis_name) / count
    y = centered / jnp.sqrt(var + eps) * gamma.astype(dtype) + beta.astype(dtype)
    y = jnp.where(valid, y, 0)
    return y.astype(x.dtype), mean, var


def _feature_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def batch_norm_train(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, axis: int = -1,
                     eps: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm: statistics over every axis but ``axis``; returns ``(y, mean, var)``
    with ``mean``/``var`` of shape ``(D,)``.

    Example: the ground truth for a gradient test of your own.

      >>> import jax, jax.numpy as jnp, jaxbn
      >>> from jaxbn import reference, testing
      >>> x = jax.random.normal(jax.random.key(0), (16, 3))
      >>> state = jaxbn.init_batch_norm_state(3)
      >>> ours = lambda x, g, b: jaxbn.batch_norm(x, g, b, state, train=True)[0]
      >>> naive = lambda x, g, b: reference.batch_norm_train(x, g, b)[0]
      >>> testing.check_vjp(ours, naive, x, jnp.ones(3), jnp.zeros(3))  # raises if they differ
    """
    axis = axis % x.ndim
    shape = _feature_shape(x.ndim, axis, x.shape[axis])
    stat_axes = tuple(a for a in range(x.ndim) if a != axis)
    y, mean, var = normalize(x, gamma.reshape(shape), beta.reshape(shape), stat_axes, eps)
    return y, mean.reshape(-1), var.reshape(-1)


def batch_norm_test(x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                    var: jax.Array, *, axis: int = -1, eps: float = 1e-5) -> jax.Array:
    """Test-mode batch norm with given (running) statistics of shape ``(D,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import reference
      >>> y = reference.batch_norm_test(jnp.array([[3.0]]), jnp.ones(1), jnp.zeros(1),
      ...                               jnp.array([1.0]), jnp.array([4.0]), eps=0.0)
      >>> y.tolist()  # (3 - 1) / sqrt(4)
      [[1.0]]
    """
    axis = axis % x.ndim
    shape = _feature_shape(x.ndim, axis, x.shape[axis])
    dtype = _float_dtype(x.dtype, gamma.dtype, mean.dtype)
    xs = x.astype(dtype)
    y = ((xs - mean.reshape(shape).astype(dtype)) / jnp.sqrt(var.reshape(shape).astype(dtype) + eps)
         * gamma.reshape(shape).astype(dtype) + beta.reshape(shape).astype(dtype))
    return y.astype(x.dtype)


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *,
               eps: float = 1e-5) -> jax.Array:
    """Layer norm over the trailing ``gamma.ndim`` axes; ``gamma``/``beta`` have their shape.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import reference
      >>> reference.layer_norm(jnp.array([[1.0, 3.0]]), jnp.ones(2), jnp.zeros(2), eps=0.0).tolist()
      [[-1.0, 1.0]]
    """
    stat_axes = tuple(range(x.ndim - gamma.ndim, x.ndim))
    return normalize(x, gamma, beta, stat_axes, eps)[0]


def group_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, groups: int,
               eps: float = 1e-5, layout: str = "NCHW",
               axes: Sequence[int] | None = None) -> jax.Array:
    """Group norm of channels-first (``N, C, ...``) or channels-last (``N, ..., C``) data with
    per-channel ``gamma``/``beta`` of shape ``(C,)``: a loop over the groups, no reshape trick.
    Each group's statistics cover its channels and ``axes`` (non-negative, without the channel
    axis; default every axis but the batch axis 0).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import reference
      >>> x = jnp.array([[[1.0], [3.0], [10.0], [30.0]]])  # (N, C, W): groups {0, 1} and {2, 3}
      >>> reference.group_norm(x, jnp.ones(4), jnp.zeros(4), groups=2, eps=0.0).ravel().tolist()
      [-1.0, 1.0, -1.0, 1.0]
    """
    channel_axis = 1 if layout.startswith("NC") else x.ndim - 1
    channels = x.shape[channel_axis]
    size = channels // groups
    param_shape = _feature_shape(x.ndim, channel_axis, channels)
    gamma, beta = gamma.reshape(param_shape), beta.reshape(param_shape)
    pieces = []
    for g in range(groups):
        index = tuple(slice(g * size, (g + 1) * size) if a == channel_axis else slice(None)
                      for a in range(x.ndim))
        stat_axes = (tuple(range(1, x.ndim)) if axes is None
                     else tuple(sorted({*axes, channel_axis})))
        pieces.append(normalize(x[index], gamma[index], beta[index], stat_axes, eps)[0])
    return jnp.concatenate(pieces, axis=channel_axis)


def dropout(key: jax.Array, x: jax.Array, *, rate: float) -> jax.Array:
    """Inverted dropout as :func:`jaxbn.dropout` documents it, written from that description.

    ``b = 8`` random bits per element when ``(1 - rate) * 256`` is a whole number, else 16;
    element ``j`` of the last axis takes the ``j % (32 / b)``-th little-endian ``b``-bit piece of
    word ``j // (32 / b)`` of ``jax.random.bits(key, (..., ceil(n / (32 / b))), uint32)`` (here
    split by a bitcast, not by shifts); keep where it is below ``t = round((1 - rate) 2^b)``,
    and scale the kept values by ``2^b / t``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> from jaxbn import reference
      >>> key, x = jax.random.key(0), jnp.ones((4, 5))
      >>> bool(jnp.all(reference.dropout(key, x, rate=0.5) == jaxbn.dropout(key, x, rate=0.5,
      ...                                                                 train=True)))
      True
    """
    keep = 1.0 - rate
    bits = 8 if keep * 256 == round(keep * 256) else 16
    levels = 2 ** bits
    threshold = round(keep * levels)
    if threshold == 0:
        return jnp.zeros_like(x)
    shape = x.shape if x.ndim else (1,)
    pieces = 32 // bits
    words = jax.random.bits(key, shape[:-1] + (-(-shape[-1] // pieces),), jnp.uint32)
    values = jax.lax.bitcast_convert_type(words, jnp.uint8 if bits == 8 else jnp.uint16)
    values = values.reshape(shape[:-1] + (-1,))[..., :shape[-1]].reshape(x.shape)
    y = jnp.where(values < threshold, x.astype(jnp.float64 if x.dtype == jnp.float64
                                               else jnp.float32) * (levels / threshold), 0)
    return y.astype(x.dtype)


def bernoulli_dropout(key: jax.Array, x: jax.Array, *, rate: float) -> jax.Array:
    """Inverted dropout as ``bernoulli`` + ``where``: the mask Flax's and Equinox's dropout draw
    (and jaxbn's adapters of them).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn import reference
      >>> y = reference.bernoulli_dropout(jax.random.key(0), jnp.ones(1000), rate=0.25)
      >>> sorted(set(y.tolist()))
      [0.0, 1.3333333333333333]
    """
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def batch_renorm_train(x: jax.Array, gamma: jax.Array, beta: jax.Array, running_mean: jax.Array,
                       running_var: jax.Array, *, r_max: float, d_max: float, axis: int = -1,
                       eps: float = 1e-5) -> jax.Array:
    """Batch renormalization in train mode, written from the paper: ``y = gamma * (x_hat * r +
    d) + beta`` with ``r``, ``d`` clipped and held constant (``stop_gradient``).

    Example: ``r_max=1, d_max=0`` is batch norm.

      >>> import jax, jax.numpy as jnp
      >>> from jaxbn import reference
      >>> x, g, b = jax.random.normal(jax.random.key(0), (8, 3)), jnp.ones(3), jnp.zeros(3)
      >>> y = reference.batch_renorm_train(x, g, b, jnp.zeros(3), jnp.ones(3), r_max=1.0,
      ...                                  d_max=0.0)
      >>> bool(jnp.allclose(y, reference.batch_norm_train(x, g, b)[0], atol=1e-6))
      True
    """
    axis = axis % x.ndim
    shape = _feature_shape(x.ndim, axis, x.shape[axis])
    stat_axes = tuple(a for a in range(x.ndim) if a != axis)
    dtype = _float_dtype(x.dtype, gamma.dtype)
    xs = x.astype(dtype)
    mean = jnp.mean(xs, stat_axes, keepdims=True)
    sigma = jnp.sqrt(jnp.mean(jnp.square(xs - mean), stat_axes, keepdims=True) + eps)
    sigma_running = jnp.sqrt(running_var.reshape(shape).astype(dtype) + eps)
    r = jax.lax.stop_gradient(jnp.clip(sigma / sigma_running, 1.0 / r_max, r_max))
    d = jax.lax.stop_gradient(jnp.clip((mean - running_mean.reshape(shape)) / sigma_running,
                                       -d_max, d_max))
    y = gamma.reshape(shape) * ((xs - mean) / sigma * r + d) + beta.reshape(shape)
    return y.astype(x.dtype)
