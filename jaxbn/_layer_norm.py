"""Per-example normalizations (no batch dependence, no state): ``layer_norm``, ``group_norm``
and ``normalize_over``, the core behind the framework adapters' layer and group norm over any
axes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks, _layout
from jaxbn._batch_norm import _affine_params, check_axis_name
from jaxbn._layout import check_image_layout
from jaxbn._normalize import BACKWARDS, configure, normalize


def _check_common(eps, backward):
    _checks.check_choice("backward", backward, BACKWARDS)
    return _checks.check_real("eps", eps, low=0.0, low_open=True)


def layer_norm(x: jax.Array, gamma: jax.Array | None, beta: jax.Array | None, *,
               eps: float = 1e-5, backward: str = "alt", normalized_ndim: int = 1,
               mask: jax.Array | None = None) -> jax.Array:
    r"""Layer normalization: each example normalized over its last axis (or last few).

    .. math::

        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        \mu, \sigma^2 = \text{mean and biased variance of } x \text{ over its last axis}

    Train and test are the same computation (no batch statistics, no state).

    Shapes: ``N`` batch (any number of leading axes, or none), ``D`` features; ``x`` is
    ``(..., D)``, ``gamma`` and ``beta`` are ``(D,)``; with ``normalized_ndim=k`` the statistics
    and the parameters cover the last ``k`` axes (PyTorch's ``normalized_shape``).

    Args:
      x: input of rank >= 1, floating; statistics in float32 for bfloat16/float16 input.
      gamma: scale, ``x.shape[-normalized_ndim:]``; None for no scale.
      beta: shift, the same shape; None for no shift.
      eps: added to the variance, > 0.
      backward: ``"alt"`` (default, the hand-written closed-form ``custom_vjp``), ``"graph"`` (the
        staged hand-written rule) or ``"autodiff"`` (the naive forward, supports ``jax.jvp``).
      normalized_ndim: how many trailing axes to normalize over (default 1).
      mask: boolean, broadcastable to ``x``: only ``True`` entries enter each example's
        statistics; ``False`` entries are padding (output and gradient 0, whatever they hold).
        With a mask, ``backward`` is ``"alt"`` or ``"autodiff"``.

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Raises:
      TypeError: non-floating ``x`` or parameters. ValueError: rank 0 ``x``, parameter shapes,
      ``eps <= 0``, unknown ``backward``.

    Example:
      >>> import jax.numpy as jnp, jaxbn
      >>> x = jnp.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])
      >>> y = jaxbn.layer_norm(x, jnp.ones(3), jnp.zeros(3))
      >>> bool(jnp.allclose(y, jnp.array([-1.2247, 0.0, 1.2247]), atol=1e-4))  # every row
      True
    """
    eps = _check_common(eps, backward)
    x = _checks.check_float_array("x", x)
    k = _checks.check_positive_int("normalized_ndim", normalized_ndim)
    _checks.check_ndim("x", x, min_ndim=k, what=f"{k} normalized trailing axes")
    lay = _layout.layout(x.shape, "layer", num_axes=k)
    return _apply(x, gamma, beta, lay, eps, backward, mask)


def prepare(x, gamma, beta, lay, eps, backward, masked=False, axis_name=None):
    """Checks the parameters against the layout; returns the core's inputs in its view."""
    x = _checks.check_float_array("x", x)
    gamma, beta = _affine_params(gamma, beta, lay, x.dtype)
    config = configure(lay, eps=eps, backward=backward, x_dtype=x.dtype, param_dtype=gamma.dtype,
                       axis_name=axis_name, masked=masked)
    return x.reshape(lay.view), gamma, beta, config


def _check_mask(mask, lay):
    """A boolean mask broadcastable to x, in the layout's view."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask(mask)
    try:
        full = jnp.broadcast_to(mask, lay.shape)
    except ValueError:
        raise ValueError(f"mask must broadcast to x's shape {lay.shape}; got shape "
                         f"{tuple(mask.shape)}.") from None
    return full.reshape(lay.view)


def _apply(x, gamma, beta, lay, eps, backward, mask=None, axis_name=None):
    mask = _check_mask(mask, lay)
    core = prepare(x, gamma, beta, lay, eps, backward, masked=mask is not None,
                   axis_name=axis_name)
    return normalize(*core, mask)[0].reshape(lay.shape)


def _distinct_axes(name: str, axes: Any, ndim: int) -> tuple[int, ...]:
    """Sorted non-negative axes of an x of rank ``ndim``, each named once."""
    items = tuple(axes) if isinstance(axes, Sequence) else (axes,)
    normalized = [_checks.check_axis(name, a, ndim) for a in items]
    if len(set(normalized)) != len(normalized):
        raise ValueError(f"{name} must name each axis of x once; got {axes!r}.")
    return tuple(sorted(normalized))


def normalize_over(x: jax.Array, gamma: jax.Array | None, beta: jax.Array | None, *,
                   axes: Any, param_axes: Any, groups: int | None = None, eps: float = 1e-5,
                   backward: str = "alt", mask: jax.Array | None = None, axis_name: Any = None,
                   axis_index_groups: Any = None) -> jax.Array:
    """Per-example normalization over any axes of ``x``: layer norm with statistics over
    ``axes`` and ``gamma``/``beta`` along ``param_axes`` (Flax's ``reduction_axes`` and
    ``feature_axes``), or with ``groups`` group norm of the one channel axis ``param_axes``
    split into ``groups`` groups, each group's statistics over its channels and ``axes``.

    The core behind the framework adapters; :func:`layer_norm` and :func:`group_norm` are its
    common cases. Statistics of one value give ``y = beta`` (variance 0), as in Flax.

    Args:
      x: input, floating.
      gamma, beta: ``x.shape`` along ``param_axes`` (in axis order), or None.
      axes: the statistics' axes (an int or a sequence; for group norm, without the channel axis).
      param_axes: the axes the parameters vary along (for group norm, the channel axis).
      groups: None for layer norm; the number of groups (a divisor of the channels) for group
        norm.
      eps, backward, mask: as in :func:`layer_norm` (``mask`` broadcastable to ``x``).
      axis_name, axis_index_groups: mapped axes whose slices of ``x`` the statistics are also
        taken across (x sharded along a reduced axis), as in :func:`jaxbn.batch_norm`.

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn._layer_norm import normalize_over
      >>> x = jax.random.normal(jax.random.key(0), (2, 5, 3))
      >>> y = normalize_over(x, jnp.ones(5), jnp.zeros(5), axes=1, param_axes=1)  # non-trailing
      >>> bool(jnp.allclose(y.mean(1), 0, atol=1e-6)), bool(jnp.allclose(y.std(1), 1, atol=1e-4))
      (True, True)
    """
    eps = _check_common(eps, backward)
    x = _checks.check_float_array("x", x)
    stat = _distinct_axes("axes", axes, x.ndim)
    params = _distinct_axes("param_axes", param_axes, x.ndim)
    if groups is None:
        lay = _layout.layout(x.shape, "layer", axes=stat, param_axes=params)
    else:
        if len(params) != 1 or params[0] in stat:
            raise ValueError(f"group norm's param_axes must be the one channel axis, not among "
                             f"axes; got param_axes={param_axes!r}, axes={axes!r}.")
        channels = x.shape[params[0]]
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
                or channels % groups:
            raise ValueError(f"groups must be a positive divisor of the {channels} channels of "
                             f"x (axis {params[0]}); got {groups!r}.")
        lay = _layout.layout(x.shape, "group", axis=params[0], groups=groups, axes=stat)
    axis_name = check_axis_name(axis_name, axis_index_groups)
    return _apply(x, gamma, beta, lay, eps, backward, mask, axis_name)


def group_norm(x: jax.Array, gamma: jax.Array | None, beta: jax.Array | None, *, groups: int,
               eps: float = 1e-5, layout: str = "NCHW", backward: str = "alt",
               mask: jax.Array | None = None) -> jax.Array:
    r"""Group normalization of image data: each example's channels split into ``groups``.

    The default layout is ``"NCHW"``; for Flax/Equinox-style ``(N, H, W, C)`` data pass
    ``layout="NHWC"``. A wrong layout is caught by the parameter shapes (the error names the fix)
    unless C == H, which nothing can tell apart: pass ``layout`` explicitly for such data.

    The ``C`` channels of each example are split into ``groups`` contiguous groups of ``C / G``
    channels; each (example, group) is normalized over its ``C/G x H x W`` values, then scaled and
    shifted per channel. ``groups=1`` is layer norm over (C, H, W); ``groups=C`` is instance norm.

    Shapes: ``N`` batch, ``C`` channels, ``H, W`` height and width, ``G`` groups; ``x`` is
    ``(N, C, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C)`` (``"NHWC"``), or the 1-D/3-D forms
    ``"NCW"``/``"NWC"``/``"NCDHW"``/``"NDHWC"``; ``gamma``/``beta`` ``(C,)``.

    Args:
      x: input of the layout's rank, floating.
      gamma: per-channel scale, ``(C,)``; None for no scale.
      beta: per-channel shift, ``(C,)``; None for no shift.
      groups: number of groups ``G``, a positive divisor of ``C``.
      eps: added to the variance, > 0.
      layout: ``"NCHW"`` or ``"NHWC"`` (or a 1-D/3-D layout as above).
      backward: as in :func:`layer_norm`.
      mask: as in :func:`layer_norm` (broadcastable to ``x``).

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Raises:
      TypeError: non-floating input, non-int ``groups``. ValueError: rank, parameter shapes,
      ``groups`` not a positive divisor of ``C``, unknown ``layout``/``backward``, ``eps <= 0``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = 5.0 * jax.random.normal(jax.random.key(0), (2, 6, 4, 4)) + 2.0  # (N, C, H, W)
      >>> y = jaxbn.group_norm(x, jnp.ones(6), jnp.zeros(6), groups=3)
      >>> per_group = y.reshape(2, 3, -1)  # (example, group, its 2 x 4 x 4 values)
      >>> bool(jnp.allclose(per_group.mean(-1), 0, atol=1e-5))
      True
      >>> bool(jnp.allclose(per_group.std(-1), 1, atol=1e-3))
      True
    """
    eps = _check_common(eps, backward)
    x = _checks.check_float_array("x", x)
    check_image_layout("layout", layout, x.shape)
    channels = x.shape[_layout.channel_axis(layout, x.ndim)]
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int; got {groups!r} of type {type(groups).__name__}.")
    if groups < 1 or channels % groups:
        raise ValueError(f"groups must be a positive divisor of the {channels} channels of x "
                         f"(layout={layout!r}); got {groups}.")
    # Splitting the channel axis in two is a free reshape (no copy); the statistics then reduce
    # over (channels in group, H, W) in place.
    lay = _layout.layout(x.shape, "group", image_layout=layout, groups=groups)
    if lay.values_per_stat < 2:
        raise ValueError(f"each group must hold at least 2 values per example (the variance of "
                         f"one value is 0); got {lay.values_per_stat} with groups={groups} on x "
                         f"of shape {tuple(x.shape)}, layout={layout!r}. Use fewer groups.")
    return _apply(x, gamma, beta, lay, eps, backward, mask)
