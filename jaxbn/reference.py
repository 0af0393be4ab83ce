"""Naive forwards in plain ``jnp``: the ground truth the hand-written rules are tested against.

Nothing here has a custom derivative: differentiating these functions with JAX gives the exact
gradients the ``custom_vjp`` rules in jaxbn must reproduce. They are also what
``backward="autodiff"`` runs. They take the same arguments as the public functions but skip their
argument checks.

Shape legend: ``N`` batch, ``D`` features, ``C, H, W`` channels, height, width, ``G`` groups.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jaxbn._checks import stat_dtype

__all__ = ["normalize", "batch_norm_train", "batch_norm_test", "layer_norm", "group_norm",
           "dropout"]


def _sum(a: jax.Array, axes: Sequence[int], axis_name: Any = None) -> jax.Array:
    total = jnp.sum(a, axis=tuple(axes), keepdims=True)
    return total if axis_name is None else jax.lax.psum(total, axis_name)


def _count(shape: Sequence[int], axes: Sequence[int], axis_name: Any = None) -> int:
    count = 1
    for a in axes:
        count *= shape[a]
    return count if axis_name is None else count * jax.lax.psum(1, axis_name)


def normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array, stat_axes: Sequence[int],
              eps: float, axis_name: Any = None,
              weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``y = gamma * (x - mean) / sqrt(var + eps) + beta`` with statistics over ``stat_axes``.

    ``gamma`` and ``beta`` are already shaped to broadcast against ``x``. The statistics are taken
    in float32 (float64 for float64 data), the variance by two passes (no cancellation), and
    combined over the mapped axes ``axis_name`` when given. With 0/1 ``weights`` (broadcastable to
    ``x``) only the valid entries count; no valid entry gives mean 0 and variance 0.

    Returns:
      ``(y, mean, var)``: ``y`` in ``x.dtype``; ``mean`` and ``var`` (biased) keep the reduced axes
      as size 1.
    """
    dtype = stat_dtype(x.dtype, gamma.dtype, beta.dtype)
    xs = x.astype(dtype)
    if weights is None:
        count = _count(x.shape, stat_axes, axis_name)
        mean = _sum(xs, stat_axes, axis_name) / count
        var = _sum(jnp.square(xs - mean), stat_axes, axis_name) / count
    else:
        w = jnp.broadcast_to(weights.astype(dtype), xs.shape)
        count = jnp.maximum(_sum(w, stat_axes, axis_name), 1)
        mean = _sum(w * xs, stat_axes, axis_name) / count
        var = _sum(w * jnp.square(xs - mean), stat_axes, axis_name) / count
    y = (xs - mean) / jnp.sqrt(var + eps) * gamma.astype(dtype) + beta.astype(dtype)
    return y.astype(x.dtype), mean, var


def _feature_shape(ndim: int, axis: int, size: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = size
    return tuple(shape)


def batch_norm_train(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, axis: int = -1,
                     eps: float = 1e-5) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode batch norm: statistics over every axis but ``axis``; returns ``(y, mean, var)``
    with ``mean``/``var`` of shape ``(D,)``."""
    axis = axis % x.ndim
    shape = _feature_shape(x.ndim, axis, x.shape[axis])
    stat_axes = tuple(a for a in range(x.ndim) if a != axis)
    y, mean, var = normalize(x, gamma.reshape(shape), beta.reshape(shape), stat_axes, eps)
    return y, mean.reshape(-1), var.reshape(-1)


def batch_norm_test(x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                    var: jax.Array, *, axis: int = -1, eps: float = 1e-5) -> jax.Array:
    """Test-mode batch norm with given (running) statistics of shape ``(D,)``."""
    axis = axis % x.ndim
    shape = _feature_shape(x.ndim, axis, x.shape[axis])
    dtype = stat_dtype(x.dtype, gamma.dtype, mean.dtype)
    xs = x.astype(dtype)
    y = ((xs - mean.reshape(shape).astype(dtype)) / jnp.sqrt(var.reshape(shape).astype(dtype) + eps)
         * gamma.reshape(shape).astype(dtype) + beta.reshape(shape).astype(dtype))
    return y.astype(x.dtype)


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *,
               eps: float = 1e-5) -> jax.Array:
    """Layer norm over the last axis with per-feature ``gamma``/``beta`` of shape ``(D,)``."""
    return normalize(x, gamma, beta, (x.ndim - 1,), eps)[0]


def group_layout(shape: Sequence[int], groups: int, layout: str):
    """How group norm views image data: channels split into ``(groups, C // groups)``.

    Returns ``(split_shape, param_shape, stat_axes)``: the free reshape of x that separates the
    groups, the shape per-channel parameters broadcast as against it, and the axes each group's
    statistics reduce over (channels in the group, H, W).
    """
    if layout == "NCHW":
        n, c, h, w = shape
        return ((n, groups, c // groups, h, w), (1, groups, c // groups, 1, 1), (2, 3, 4))
    n, h, w, c = shape
    return (n, h, w, groups, c // groups), (1, 1, 1, groups, c // groups), (1, 2, 4)


def group_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, groups: int,
               eps: float = 1e-5, layout: str = "NCHW") -> jax.Array:
    """Group norm of (N, C, H, W) or (N, H, W, C) data, per-channel ``gamma``/``beta`` ``(C,)``."""
    split, param_shape, stat_axes = group_layout(x.shape, groups, layout)
    y = normalize(x.reshape(split), gamma.reshape(param_shape), beta.reshape(param_shape),
                  stat_axes, eps)[0]
    return y.reshape(x.shape)


def dropout(key: jax.Array, x: jax.Array, *, rate: float) -> jax.Array:
    """Inverted dropout as ``bernoulli`` + ``where``: drop with probability ``rate``."""
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
