"""Framework conventions mapped onto jaxbn's functions: the one place the adapters share.

Flax names the feature axes (``axis``, ``feature_axes``), the reduction axes
(``reduction_axes``) and masks of x's own shape; jaxbn names one feature axis, trailing
normalized axes or an image layout, and masks over positions. The functions here translate the
first into the second and call the public functions, so that :mod:`jaxbn.flax.nnx`,
:mod:`jaxbn.flax.linen` and :mod:`jaxbn.equinox` hold only their framework's variable plumbing.
None of this imports a framework.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._batch_norm import BatchNormState, batch_norm
from jaxbn._layer_norm import group_norm, layer_norm


def canonical_axes(name: str, axes: Any, ndim: int) -> tuple[int, ...]:
    """An int or a sequence of ints, each in [-ndim, ndim), as sorted non-negative axes."""
    items = (axes,) if isinstance(axes, int) else tuple(axes)
    for a in items:
        if isinstance(a, bool) or not isinstance(a, int) or not -ndim <= a < ndim:
            raise ValueError(f"{name} must be axes of x (rank {ndim}); got {axes!r}.")
    return tuple(sorted({a % ndim for a in items}))


def _feature_axis(axis: Any, ndim: int) -> int:
    axes = canonical_axes("axis", axis, ndim)
    if len(axes) != 1:
        raise ValueError(f"axis must name one feature axis (jaxbn normalizes per feature along "
                         f"one axis); got {axis!r}.")
    return axes[0]


def position_mask(mask: Any, shape: tuple[int, ...], axis: int) -> jax.Array | None:
    """A Flax mask (broadcastable to x) as jaxbn's: one flag per position, x's shape without
    ``axis``. jaxbn masks positions (whole feature vectors), so the mask must not vary along it."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask(mask)
    if mask.ndim > len(shape):
        raise ValueError(f"mask must broadcast to x's shape {shape}; got shape {mask.shape}.")
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    if mask.shape[axis] != 1:
        raise ValueError(f"mask must have size 1 along the feature axis {axis} (jaxbn masks "
                         f"positions: a position is in the statistics for every feature or for "
                         f"none); got shape {mask.shape} for x of shape {shape}.")
    return jnp.squeeze(mask, axis)


def flax_batch_norm(x, scale, bias, mean, var, *, use_running_average: bool, axis: Any,
                    momentum: float, epsilon: float, axis_name: Any, axis_index_groups: Any,
                    mask: Any, **options) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flax's ``BatchNorm`` call on jaxbn's :func:`batch_norm`: ``(y, new_mean, new_var)``."""
    feature = _feature_axis(axis, x.ndim)
    y, state = batch_norm(x, scale, bias, BatchNormState(mean, var),
                          train=not use_running_average, momentum=momentum, eps=epsilon,
                          axis=feature, axis_name=axis_name, axis_index_groups=axis_index_groups,
                          mask=position_mask(mask, x.shape, feature), **options)
    return y, state.mean, state.var


def _affine_over(param, shape: tuple[int, ...], kept: tuple[int, ...]):
    """A Flax parameter of the kept axes' size, broadcast over ``shape`` (the normalized axes);
    autodiff sums its gradient back."""
    if param is None:
        return None
    view = tuple(n if i in kept else 1 for i, n in enumerate(shape))
    return jnp.broadcast_to(param.reshape(view), shape)


def flax_layer_norm(x, scale, bias, *, epsilon: float, reduction_axes: Any, feature_axes: Any,
                    mask: Any = None, backward: str = "alt") -> jax.Array:
    """Flax's ``LayerNorm`` on jaxbn's :func:`layer_norm`: reduction over trailing axes, the
    parameters along ``feature_axes`` (a subset of them)."""
    reduced = canonical_axes("reduction_axes", reduction_axes, x.ndim)
    features = canonical_axes("feature_axes", feature_axes, x.ndim)
    k = len(reduced)
    if reduced != tuple(range(x.ndim - k, x.ndim)) or not set(features) <= set(reduced):
        raise ValueError(f"jaxbn's LayerNorm normalizes over trailing axes with its parameters "
                         f"along some of them; got reduction_axes={reduction_axes!r}, "
                         f"feature_axes={feature_axes!r} for x of rank {x.ndim}.")
    kept = tuple(a - (x.ndim - k) for a in features)
    shape = x.shape[x.ndim - k:]
    return layer_norm(x, _affine_over(scale, shape, kept), _affine_over(bias, shape, kept),
                      eps=epsilon, normalized_ndim=k, mask=mask, backward=backward)


def flax_group_norm(x, scale, bias, *, num_groups: int, epsilon: float, reduction_axes: Any,
                    mask: Any = None, backward: str = "alt") -> jax.Array:
    """Flax's ``GroupNorm`` (channels last, statistics over the trailing ``reduction_axes``) on
    jaxbn's :func:`group_norm`, through the free view ``(batch, positions, channels)``."""
    if reduction_axes is None:
        reduction_axes = tuple(range(1, x.ndim))
    reduced = canonical_axes("reduction_axes", reduction_axes, x.ndim)
    start = x.ndim - len(reduced)
    if x.ndim < 2 or reduced != tuple(range(start, x.ndim)) or start == 0:
        raise ValueError(f"jaxbn's GroupNorm reduces over trailing axes ending with the channels, "
                         f"after at least one batch axis; got reduction_axes={reduction_axes!r} "
                         f"for x of rank {x.ndim}.")
    view = (math.prod(x.shape[:start]), math.prod(x.shape[start:-1]), x.shape[-1])
    if mask is not None:
        mask = _checks.check_bool_mask(mask)
        try:
            mask = jnp.broadcast_to(mask, x.shape).reshape(view)
        except ValueError:
            raise ValueError(f"mask must broadcast to x's shape {tuple(x.shape)}; got shape "
                             f"{tuple(mask.shape)}.") from None
    y = group_norm(x.reshape(view), scale, bias, groups=num_groups, eps=epsilon, layout="NWC",
                   mask=mask, backward=backward)
    return y.reshape(x.shape)


def require(module: str, extra: str) -> Any:
    """Imports a framework, or raises an ImportError that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this jaxbn adapter needs {module.split('.')[0]}, which is not "
                          f"installed: pip install 'jaxbn[{extra}]'") from error


def choose(name: str, call_value: Any, layer_value: Any, fix: str) -> bool:
    """The call's mode flag if given, else the layer's; a Python bool either way."""
    value = layer_value if call_value is None else call_value
    if value is None:
        raise ValueError(f"no {name} was given to the layer or to the call: {fix}")
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool (it picks a code path when the model is "
                        f"traced); got {value!r}.")
    return bool(value)


def unsupported(layer: str, **options: Any) -> None:
    """Rejects framework options that jaxbn's layer does not implement (rather than ignoring
    them)."""
    for name, value in options.items():
        if value is not None:
            raise ValueError(f"jaxbn's {layer} does not support {name} (got {value!r}); use "
                             f"the framework's own {layer} for it.")
