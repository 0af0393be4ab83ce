"""Per-example normalizations: ``layer_norm`` and ``group_norm`` (no batch dependence, no state)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxbn import _checks, _layout
from jaxbn._batch_norm import _affine_params
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


def prepare(x, gamma, beta, lay, eps, backward, masked=False):
    """Checks the parameters against the layout; returns the core's inputs in its view."""
    x = _checks.check_float_array("x", x)
    gamma, beta = _affine_params(gamma, beta, lay, x.dtype)
    config = configure(lay, eps=eps, backward=backward, x_dtype=x.dtype, param_dtype=gamma.dtype,
                       masked=masked)
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


def _apply(x, gamma, beta, lay, eps, backward, mask=None):
    mask = _check_mask(mask, lay)
    core = prepare(x, gamma, beta, lay, eps, backward, masked=mask is not None)
    return normalize(*core, mask)[0].reshape(lay.shape)


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
