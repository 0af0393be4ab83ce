"""Framework conventions mapped onto jaxbn's functions: the one place the adapters share.

Flax names the feature axes (``axis``, ``feature_axes``), the reduction axes
(``reduction_axes``), masks broadcastable to x and its dtype rules (``promote_dtype``, Linen's
output ``dtype``); jaxbn names one feature axis, statistics and parameter axes, and masks of x's
rank. The functions here translate the first into the second and call jaxbn's core, so that
:mod:`jaxbn.flax.nnx`, :mod:`jaxbn.flax.linen` and :mod:`jaxbn.equinox` hold only their
framework's variable plumbing. None of this imports a framework.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._batch_norm import BatchNormState, batch_norm
from jaxbn._layer_norm import normalize_over


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


def flax_mask(mask: Any, ndim: int) -> jax.Array | None:
    """A Flax mask (boolean, broadcastable to x) with x's rank: leading axes of size 1 added."""
    if mask is None:
        return None
    mask = _checks.check_bool_mask(mask)
    if mask.ndim > ndim:
        raise ValueError(f"mask must broadcast to x (rank {ndim}); got shape {mask.shape}.")
    return mask.reshape((1,) * (ndim - mask.ndim) + mask.shape)


def promote(arrays: tuple, dtype: Any = None) -> tuple:
    """Flax's ``promote_dtype``: the arrays (None kept as None) in ``dtype``, or without one in
    their common dtype, integers as float32. The common dtype is JAX's standard promotion, found
    without ``jnp.result_type`` so that it holds under strict dtype promotion too."""
    if dtype is None:
        dtypes = [jnp.dtype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.integer) else a.dtype
                  for a in arrays if a is not None]
        dtype = _checks.common_dtype(*dtypes)
    return tuple(None if a is None else jnp.asarray(a, dtype) for a in arrays)


def linen_dtypes(x: Any, params: tuple, dtype: Any) -> tuple[jax.Array, jnp.dtype]:
    """Flax Linen's dtype contract: statistics and normalization from ``x`` as given (not cast
    to ``dtype`` first), the output in ``dtype`` or, without one, in the common dtype of x and
    the parameters. Returns x for the core, cast up (exactly) where the output is wider, and the
    output dtype."""
    x = _checks.check_float_array("x", x, complex_ok=True)
    out = (jnp.dtype(dtype) if dtype is not None
           else _checks.common_dtype(x.dtype, *(p.dtype for p in params if p is not None)))
    return x.astype(_checks.common_dtype(x.dtype, out)), out


def updated_dtypes(mean, var, x_dtype: Any, dtype: Any, float32_reductions: bool = True):
    """The running statistics cast to the dtypes Flax's update ``momentum * old + (1 -
    momentum) * batch`` gives them: the old ones' promoted with the batch statistics' (computed
    in ``dtype`` or x's, at least float32 unless ``float32_reductions`` is off; the variance
    real), so float64 for float64 x and complex for complex x, as in Flax."""
    stats = jnp.dtype(x_dtype if dtype is None else dtype)
    if float32_reductions:
        stats = _checks.stat_dtype(stats)
    return (mean.astype(_checks.common_dtype(stats, mean.dtype)),
            var.astype(_checks.common_dtype(_checks.real_dtype(stats), var.dtype)))


def flax_batch_norm(x, scale, bias, mean, var, *, use_running_average: bool, axis: Any,
                    momentum: float, epsilon: float, axis_name: Any, axis_index_groups: Any,
                    mask: Any, **options) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Flax's ``BatchNorm`` call on jaxbn's :func:`batch_norm`: ``(y, new_mean, new_var)``.

    Flax's conventions, translated: a mask broadcastable to x (per entry); an x of rank 1 is one
    example; a batch of one normalizes to ``bias`` (variance 0); the axis name is used only
    where statistics are taken (eval mode needs none bound); complex x has a complex running
    mean.
    """
    shape = x.shape
    feature = _feature_axis(axis, x.ndim)
    if x.ndim == 1:  # one example of D features
        x, feature = x[None], 1
    mask = flax_mask(mask, len(shape))
    if mask is not None and len(shape) == 1:
        mask = mask[None]
    if _checks.is_complex(x.dtype) and not _checks.is_complex(mean.dtype):
        mean = mean.astype(_checks.stat_dtype(x.dtype))
    train = not use_running_average
    y, state = batch_norm(x, scale, bias, BatchNormState(mean, var), train=train,
                          momentum=momentum, eps=epsilon, axis=feature,
                          axis_name=axis_name if train else None,
                          axis_index_groups=axis_index_groups if train else None, mask=mask,
                          allow_one_value=True, **options)
    return y.reshape(shape), state.mean, state.var


def flax_layer_norm(layer, x, scale, bias, mask: Any = None) -> jax.Array:
    """Flax's ``LayerNorm`` (NNX or Linen ``layer``, whose fields it reads): statistics over
    ``reduction_axes``, the parameters along ``feature_axes`` (any axes of x), on jaxbn's
    :func:`~jaxbn._layer_norm.normalize_over`."""
    reduced = canonical_axes("reduction_axes", layer.reduction_axes, x.ndim)
    features = canonical_axes("feature_axes", layer.feature_axes, x.ndim)
    shape = tuple(x.shape[a] for a in features)
    scale, bias = (None if p is None else _params_in(p, shape) for p in (scale, bias))
    return normalize_over(x, scale, bias, axes=reduced, param_axes=features, eps=layer.epsilon,
                          backward=layer.backward, mask=flax_mask(mask, x.ndim),
                          axis_name=layer.axis_name, axis_index_groups=layer.axis_index_groups)


def _params_in(param, shape: tuple[int, ...]):
    """A Flax parameter (``(num_features,)`` in NNX) as x's shape along the feature axes."""
    if math.prod(param.shape) != math.prod(shape):
        raise ValueError(f"the layer's parameters have shape {tuple(param.shape)}, but x has "
                         f"shape {shape} along feature_axes: construct the layer with "
                         f"num_features={math.prod(shape)}.")
    return param.reshape(shape)


def flax_group_norm(layer, x, scale, bias, num_groups: int, mask: Any = None) -> jax.Array:
    """Flax's ``GroupNorm`` (NNX or Linen ``layer``, whose fields it reads): the channels last,
    split into ``num_groups`` groups, each group's statistics over its channels and
    ``reduction_axes`` (which must include the last axis; default every axis but the first), on
    :func:`~jaxbn._layer_norm.normalize_over`."""
    reduction_axes = layer.reduction_axes
    if reduction_axes is None:
        reduction_axes = (*range(1, x.ndim - 1), -1)
    reduced = canonical_axes("reduction_axes", reduction_axes, x.ndim)
    if reduced[-1] != x.ndim - 1:
        raise ValueError("The reduction axes must include the final dimension as this is "
                         "assumed to be the feature axis.")
    return normalize_over(x, scale, bias, axes=reduced[:-1], param_axes=x.ndim - 1,
                          groups=num_groups, eps=layer.epsilon, backward=layer.backward,
                          mask=flax_mask(mask, x.ndim), axis_name=layer.axis_name,
                          axis_index_groups=layer.axis_index_groups)


def require(module: str, extra: str) -> Any:
    """Imports a framework, or raises an ImportError that names the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this jaxbn adapter needs {module.split('.')[0]}, which is not "
                          f"installed: pip install 'jaxbn[{extra}]'") from error


def choose(name: str, call_value: Any, layer_value: Any, fix: str, *,
           message: str | None = None) -> bool:
    """The call's mode flag if given, else the layer's; a Python bool either way. Neither given
    raises ``message`` (the framework's own, where its users match it) or one that ends in
    ``fix``."""
    value = layer_value if call_value is None else call_value
    if value is None:
        raise ValueError(message or f"no {name} was given to the layer or to the call: {fix}")
    if isinstance(value, jax.core.Tracer) or not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool (it picks a code path when the model is "
                        f"traced); got {value!r}.")
    return bool(value)
