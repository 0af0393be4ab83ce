"""Batch normalization with running statistics: ``batch_norm`` and ``spatial_batch_norm``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _checks, _layout
from jaxbn._layout import Layout, check_image_layout, layout
from jaxbn._normalize import BACKWARDS, Config, normalize, normalize_with


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

    ``momentum`` weights the *old* running value: ``new = momentum * old + (1 - momentum) *
    batch``, default 0.9 (the paper's and cs231n's convention). PyTorch's momentum=0.1 is
    momentum=0.9 here; ``jaxbn.torch_compat.momentum_from_torch`` converts.

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
        across ``axis_name``. The mask selects: ``False`` entries are padding, whatever they hold
        (NaN, inf), and affect no valid output, statistic or gradient; their own output and
        gradient are 0. A batch with no valid entry leaves the running statistics unchanged and
        gives finite outputs (no NaN). With ``mask`` or ``axis_name``, ``backward`` is ``"alt"``
        or ``"autodiff"`` (``"graph"`` raises).

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
    lay = layout(x.shape, "batch", axis=axis)
    return _batch_norm(x, gamma, beta, state, lay, train=train, momentum=momentum, eps=eps,
                       backward=backward, axis_name=axis_name, mask=mask)


def spatial_batch_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, state: BatchNormState, *,
                       train: bool, momentum: float = 0.9, eps: float = 1e-5,
                       layout: str = "NCHW", backward: str = "alt", axis_name: Any = None,
                       mask: jax.Array | None = None) -> tuple[jax.Array, BatchNormState]:
    """Batch normalization of image data per channel, over batch, height and width.

    The default layout is cs231n's and PyTorch's ``"NCHW"``; Flax and Equinox data is usually
    ``"NHWC"``: pass ``layout="NHWC"``. A wrong layout is caught by the parameter shapes (the
    error names the fix) unless C == H: then nothing can tell the two apart, so always pass
    ``layout`` explicitly for such data.

    The same computation as :func:`batch_norm` with the channel axis as the feature axis; the
    statistics reduce over N, H and W in place (no transpose or reshape of ``x``).

    Shapes: ``N`` batch, ``C`` channels, ``H, W`` height and width; ``x`` is ``(N, C, H, W)`` for
    ``layout="NCHW"`` or ``(N, H, W, C)`` for ``"NHWC"`` (``"NCW"``/``"NWC"`` and
    ``"NCDHW"``/``"NDHWC"`` for 1-D and 3-D data); ``gamma``, ``beta`` and the state's arrays are
    ``(C,)``.

    Args:
      x, gamma, beta, state, train, momentum, eps, backward, axis_name: as in :func:`batch_norm`.
      mask: boolean, ``(N, H, W)`` for NCHW and NHWC alike (size 1 broadcasts).
      layout: ``"NCHW"`` (default) or ``"NHWC"``, or a 1-D/3-D layout as above.

    Returns:
      ``(y, new_state)`` as in :func:`batch_norm`.

    Raises:
      As :func:`batch_norm`, and ValueError for an unknown ``layout`` or an ``x`` whose rank does
      not match it.
    """
    x = _checks.check_float_array("x", x)
    check_image_layout("layout", layout, x.shape)
    lay = _layout.layout(x.shape, "batch", image_layout=layout)
    return _batch_norm(x, gamma, beta, state, lay, train=train, momentum=momentum, eps=eps,
                       backward=backward, axis_name=axis_name, mask=mask)


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


def check_mask(mask: Any, lay: Layout) -> jax.Array | None:
    """Returns the boolean mask shaped to broadcast against the layout's view of x."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid entry); got dtype "
                        f"{mask.dtype}.")
    full = lay.mask_view(tuple(mask.shape))
    if full is None:
        expected = tuple(n for a, n in enumerate(lay.shape) if a != lay.feature_axis)
        raise ValueError(f"mask must have x's shape without the feature axis, {expected} (size 1 "
                         f"broadcasts); got shape {tuple(mask.shape)}.")
    full = jnp.broadcast_to(mask.reshape(full), _unit(lay.shape, lay.feature_axis))
    return full.reshape(_unit(lay.view, *_param_axes(lay)))


def _unit(shape, *axes):
    return tuple(1 if a in axes else n for a, n in enumerate(shape))


def _param_axes(lay: Layout) -> tuple[int, ...]:
    return tuple(a for a, n in enumerate(lay.param_view) if n != 1)


def check_param(name: str, p: Any, lay: Layout) -> jax.Array:
    """A per-feature array of exactly ``lay.param_shape`` (shapes that would broadcast are
    rejected too), floating; the error names the layout's fix."""
    p = _checks.check_float_array(name, p)
    if tuple(p.shape) != lay.param_shape:
        raise lay.param_error(name, p.shape)
    return p


def check_state(state: Any, lay: Layout) -> BatchNormState:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be a BatchNormState(mean, var); got {type(state).__name__}. "
                        f"Make one with jaxbn.init_batch_norm_state({lay.param_shape[0]}).")
    return BatchNormState(check_param("state.mean", state[0], lay),
                          check_param("state.var", state[1], lay))


class Prepared(NamedTuple):
    """A batch norm call after validation: the core's inputs in the layout's view."""

    x: jax.Array  # x.reshape(layout.view)
    gamma: jax.Array  # gamma.reshape(layout.param_view)
    beta: jax.Array
    state: BatchNormState  # without gradient
    mask: jax.Array | None  # broadcastable to x's view
    config: Config
    momentum: float
    layout: Layout


def prepare(x, gamma, beta, state, lay: Layout, *, momentum, eps, backward, axis_name,
            mask) -> Prepared:
    """Checks every argument of a batch norm call at trace time and views them for the core."""
    _checks.check_choice("backward", backward, BACKWARDS)
    momentum = _checks.check_real("momentum", momentum, low=0.0, high=1.0)
    eps = _checks.check_real("eps", eps, low=0.0, low_open=True)
    gamma, beta = check_param("gamma", gamma, lay), check_param("beta", beta, lay)
    state = jax.tree.map(jax.lax.stop_gradient, check_state(state, lay))
    check_axis_name(axis_name)
    mask = check_mask(mask, lay)
    param_dtype = jnp.result_type(gamma.dtype, beta.dtype)
    gamma = gamma.astype(param_dtype).reshape(lay.param_view)
    beta = beta.astype(param_dtype).reshape(lay.param_view)
    config = Config(stat_axes=lay.stat_axes, eps=eps, backward=backward, axis_name=axis_name)
    return Prepared(x.reshape(lay.view), gamma, beta, state, mask, config, momentum, lay)


def _check_batch_size(p: Prepared) -> None:
    count = p.layout.count
    if p.config.axis_name is not None:
        count *= jax.lax.psum(1, p.config.axis_name)
    if count < 2 and p.mask is None:
        hint = ("" if p.config.axis_name is not None else
                " Calling batch norm per example under jax.vmap? Pass axis_name= (the vmap's "
                "axis_name) so that the vmapped axis becomes the batch.")
        raise ValueError(
            f"x must have at least 2 values per feature in train mode (the batch variance of one "
            f"value is 0); got shape {p.layout.shape}, {count} value per feature.{hint}")


def _batch_norm(x, gamma, beta, state, lay, *, train, **options):
    _checks.check_train(train)
    p = prepare(x, gamma, beta, state, lay, **options)
    if not train:
        mean, var = (a.reshape(lay.param_view) for a in p.state)
        y = normalize_with(p.x, p.gamma, p.beta, mean, var, p.config.eps)
        return y.reshape(lay.shape), p.state
    _check_batch_size(p)
    y, mean, var = normalize(p.x, p.gamma, p.beta, p.config, p.mask)
    return y.reshape(lay.shape), new_state(p, mean, var)


def new_state(p: Prepared, mean: jax.Array, var: jax.Array) -> BatchNormState:
    """The running statistics after a train step with batch statistics ``mean``, ``var``."""
    mean, var = (a.reshape(-1) for a in jax.lax.stop_gradient((mean, var)))
    new = update_state(p.state, mean, var, p.momentum)
    if p.mask is None:
        return new
    # A batch without a valid entry has no statistics: keep the running ones.
    valid = jnp.sum(p.mask)
    if p.config.axis_name is not None:
        valid = jax.lax.psum(valid, p.config.axis_name)
    return jax.tree.map(lambda a, b: jnp.where(valid > 0, a, b), new, p.state)


def update_state(state: BatchNormState, mean: jax.Array, var: jax.Array,
                 momentum: float) -> BatchNormState:
    """``momentum * running + (1 - momentum) * batch`` for both statistics, without gradient."""
    mean, var = jax.lax.stop_gradient((mean, var))
    return BatchNormState(
        (momentum * state.mean + (1.0 - momentum) * mean).astype(state.mean.dtype),
        (momentum * state.var + (1.0 - momentum) * var).astype(state.var.dtype),
    )
