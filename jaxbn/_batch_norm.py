"""Batch normalization with running statistics: ``batch_norm`` and ``spatial_batch_norm``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _checks, reference
from jaxbn._normalize import BACKWARDS, Config, normalize

LAYOUTS = ("NCHW", "NHWC")


class BatchNormState(NamedTuple):
    """Running statistics of a batch norm layer (a pytree).

    Updated in train mode as ``new = momentum * old + (1 - momentum) * batch_statistic``.
    """

    mean: jax.Array  # (D,) running mean
    var: jax.Array  # (D,) running biased variance


def init_batch_norm_state(num_features: int, dtype: Any = jnp.float32) -> BatchNormState:
    """Returns the initial running statistics: mean zeros, variance ones, both ``(num_features,)``.

    Example:
      >>> state = jaxbn.init_batch_norm_state(3)
      >>> state.mean, state.var
      (Array([0., 0., 0.], dtype=float32), Array([1., 1., 1.], dtype=float32))
    """
    num_features = _checks.check_positive_int("num_features", num_features)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype must be a floating dtype; got {jnp.dtype(dtype)}.")
    return BatchNormState(jnp.zeros((num_features,), dtype), jnp.ones((num_features,), dtype))


def batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, state: BatchNormState, *,
               train: bool, momentum: float = 0.9, eps: float = 1e-5, axis: int = -1,
               backward: str = "alt", axis_name: Any = None,
               mask: jax.Array | None = None) -> tuple[jax.Array, BatchNormState]:
    r"""Batch normalization over every axis of ``x`` but the feature axis.

    .. math::

        \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad y = \gamma \hat x + \beta

    In train mode ``mu`` and ``sigma^2`` are the batch mean and the biased batch variance over all
    axes but ``axis`` (across the mapped axes ``axis_name`` too, and over the entries ``mask``
    marks valid), and the running statistics become
    ``momentum * running + (1 - momentum) * batch``. In test mode the running statistics normalize
    and the state is returned unchanged. The state never carries a gradient.

    Shapes: ``N`` batch, ``D`` features (``x.shape[axis]``); ``x`` is ``(N, D)`` or any rank >= 2.

    Args:
      x: input of rank >= 2, floating. bfloat16/float16 inputs give outputs and gradients in their
        dtype; the statistics are computed in float32.
      gamma: scale, ``(D,)``.
      beta: shift, ``(D,)``.
      state: running statistics, a :class:`BatchNormState` of two ``(D,)`` arrays.
      train: Python bool: batch statistics (True) or running statistics (False).
      momentum: weight of the *old* running value, in [0, 1] (PyTorch's momentum is 1 minus this).
      eps: added to the variance, > 0.
      axis: the feature axis.
      backward: ``"alt"`` (default) the simplified closed-form backward, ``"graph"`` the staged
        backward through the computational graph, both hand-written ``custom_vjp`` rules;
        ``"autodiff"`` the naive forward differentiated by JAX, the only one that supports
        forward-mode ``jax.jvp`` (the custom rules are reverse-mode; second-order reverse works).
      axis_name: name (or tuple of names) of mapped axes (``jax.vmap(..., axis_name=...)``,
        ``jax.shard_map``, ``jax.pmap``) whose slices form one global batch (synchronized batch
        norm): the statistics, and the backward's per-feature sums, are reduced across them with
        ``lax.psum``. The "fewer than 2 values" check counts the global batch.
      mask: boolean array of ``x``'s shape without the feature axis (size 1 broadcasts): only the
        ``True`` entries enter the statistics and the running-statistics update, count-weighted
        across ``axis_name``. Every entry is still normalized. A batch with no valid entry leaves
        the running statistics unchanged and gives finite outputs (no NaN).

    Returns:
      ``(y, new_state)``: ``y`` of ``x``'s shape and dtype, and the updated running statistics.

    Raises:
      TypeError: non-floating ``x``/parameters, non-bool ``train``, non-numeric options.
      ValueError: wrong parameter or state shapes, ``axis`` out of range, rank < 2, fewer than two
        values per feature in train mode, unknown ``backward``, ``momentum`` outside [0, 1],
        ``eps <= 0``, an unbound ``axis_name``, a mask of the wrong shape.
      TypeError: also for a non-boolean ``mask``.

    Example:
      >>> x = jax.random.normal(jax.random.key(0), (32, 4))
      >>> state = jaxbn.init_batch_norm_state(4)
      >>> y, state = jaxbn.batch_norm(x, jnp.ones(4), jnp.zeros(4), state, train=True)
    """
    x = _checks.check_float_array("x", x)
    _checks.check_ndim("x", x, min_ndim=2, what="a batch axis and a feature axis")
    axis = _checks.check_axis("axis", axis, x.ndim)
    return _batch_norm(x, gamma, beta, state, train=train, momentum=momentum, eps=eps,
                       axis=axis, backward=backward, axis_name=axis_name, mask=mask)


def spatial_batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, state: BatchNormState, *,
                       train: bool, momentum: float = 0.9, eps: float = 1e-5,
                       layout: str = "NCHW", backward: str = "alt", axis_name: Any = None,
                       mask: jax.Array | None = None) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization of image data per channel, over batch, height and width.

    The same computation as :func:`batch_norm` with the channel axis as the feature axis; the
    statistics reduce over N, H and W in place (no transpose or reshape of ``x``).

    Shapes: ``N`` batch, ``C`` channels, ``H, W`` height and width; ``x`` is ``(N, C, H, W)`` for
    ``layout="NCHW"`` (cs231n's) or ``(N, H, W, C)`` for ``"NHWC"``; ``gamma``, ``beta`` and the
    state's arrays are ``(C,)``.

    Args:
      x, gamma, beta, state, train, momentum, eps, backward, axis_name: as in :func:`batch_norm`.
      mask: boolean, ``(N, H, W)`` for NCHW and NHWC alike (size 1 broadcasts).
      layout: ``"NCHW"`` or ``"NHWC"``.

    Returns:
      ``(y, new_state)`` as in :func:`batch_norm`.

    Raises:
      As :func:`batch_norm`, and ValueError for an unknown ``layout`` or ``x`` not of rank 4.
    """
    _checks.check_choice("layout", layout, LAYOUTS)
    x = _checks.check_float_array("x", x)
    _checks.check_ndim("x", x, ndim=4, what=f"layout {layout}")
    return _batch_norm(x, gamma, beta, state, train=train, momentum=momentum, eps=eps,
                       axis=1 if layout == "NCHW" else 3, backward=backward, axis_name=axis_name,
                       mask=mask)


def check_axis_name(axis_name: Any) -> None:
    """Rejects an ``axis_name`` that no enclosing ``vmap``/``shard_map``/``pmap`` binds."""
    if axis_name is None:
        return
    try:
        jax.lax.psum(1, axis_name)
    except NameError:
        raise ValueError(
            f"axis_name {axis_name!r} is not bound here: call batch norm inside jax.vmap, "
            f"jax.shard_map or jax.pmap with that axis name, or pass axis_name=None."
        ) from None


def _check_mask(mask: Any, x: jax.Array, axis: int) -> jax.Array | None:
    """Returns the mask as 0/1 weights of x's rank (size 1 on the feature axis)."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    expected = tuple(n for a, n in enumerate(x.shape) if a != axis)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid entry); got dtype "
                        f"{mask.dtype}.")
    if mask.ndim != len(expected) or any(m not in (1, n) for m, n in zip(mask.shape, expected)):
        raise ValueError(f"mask must have x's shape without the feature axis, {expected} (size 1 "
                         f"broadcasts); got shape {tuple(mask.shape)}.")
    return jnp.expand_dims(mask, axis)


def _batch_norm(x, gamma, beta, state, *, train, momentum, eps, axis, backward, axis_name, mask):
    _checks.check_train(train)
    _checks.check_choice("backward", backward, BACKWARDS)
    momentum = _checks.check_real("momentum", momentum, low=0.0, high=1.0)
    eps = _checks.check_real("eps", eps, low=0.0, low_open=True)
    num_features = x.shape[axis]
    gamma = _checks.check_param("gamma", gamma, num_features, "feature")
    beta = _checks.check_param("beta", beta, num_features, "feature")
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be a BatchNormState(mean, var); got {type(state).__name__}. "
                        f"Make one with jaxbn.init_batch_norm_state({num_features}).")
    state = BatchNormState(_checks.check_param("state.mean", state[0], num_features, "feature"),
                           _checks.check_param("state.var", state[1], num_features, "feature"))
    param_dtype = jnp.result_type(gamma.dtype, beta.dtype)
    gamma, beta = gamma.astype(param_dtype), beta.astype(param_dtype)
    shape = [1] * x.ndim
    shape[axis] = num_features
    stat_axes = tuple(a for a in range(x.ndim) if a != axis)
    state = jax.tree.map(jax.lax.stop_gradient, state)
    check_axis_name(axis_name)
    weights = _check_mask(mask, x, axis)

    if not train:
        y = reference.batch_norm_test(x, gamma, beta, state.mean, state.var, axis=axis, eps=eps)
        return y, state

    count = 1
    for a in stat_axes:
        count *= x.shape[a]
    if axis_name is not None:
        count *= jax.lax.psum(1, axis_name)
    if count < 2 and weights is None:
        raise ValueError(
            f"x must have at least 2 values per feature in train mode (the batch variance of one "
            f"value is 0); got shape {tuple(x.shape)} with feature axis {axis}, {count} value per "
            f"feature."
        )
    config = Config(stat_axes=stat_axes, eps=eps, backward=backward, axis_name=axis_name)
    y, mean, var = normalize(x, gamma.reshape(shape), beta.reshape(shape), config, weights)
    new_state = update_state(state, mean.reshape(-1), var.reshape(-1), momentum)
    if weights is not None:
        # A batch without a valid entry has no statistics: keep the running ones.
        valid = jnp.sum(weights) if axis_name is None else jax.lax.psum(jnp.sum(weights),
                                                                          axis_name)
        new_state = jax.tree.map(lambda new, old: jnp.where(valid > 0, new, old), new_state, state)
    return y, new_state


def update_state(state: BatchNormState, mean: jax.Array, var: jax.Array,
                 momentum: float) -> BatchNormState:
    """``momentum * running + (1 - momentum) * batch`` for both statistics, without gradient."""
    mean, var = jax.lax.stop_gradient((mean, var))
    return BatchNormState(
        (momentum * state.mean + (1.0 - momentum) * mean).astype(state.mean.dtype),
        (momentum * state.var + (1.0 - momentum) * var).astype(state.var.dtype),
    )
