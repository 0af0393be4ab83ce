"""Per-example normalizations: ``layer_norm`` and ``group_norm`` (no batch dependence, no state)."""

from __future__ import annotations

import jax

from jaxbn import _checks, _layout
from jaxbn._batch_norm import check_param
from jaxbn._layout import check_image_layout
from jaxbn._normalize import BACKWARDS, Config, normalize


def _check_common(eps, backward):
    _checks.check_choice("backward", backward, BACKWARDS)
    return _checks.check_real("eps", eps, low=0.0, low_open=True)


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, eps: float = 1e-5,
               backward: str = "alt") -> jax.Array:
    r"""Layer normalization: each example normalized over its last axis.

    .. math::

        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
        \mu, \sigma^2 = \text{mean and biased variance of } x \text{ over its last axis}

    Train and test are the same computation (no batch statistics, no state).

    Shapes: ``N`` batch (any number of leading axes, or none), ``D`` features; ``x`` is
    ``(..., D)``, ``gamma`` and ``beta`` are ``(D,)``.

    Args:
      x: input of rank >= 1, floating; statistics in float32 for bfloat16/float16 input.
      gamma: scale, ``(D,)``.
      beta: shift, ``(D,)``.
      eps: added to the variance, > 0.
      backward: ``"alt"`` (default, the hand-written closed-form ``custom_vjp``), ``"graph"`` (the
        staged hand-written rule) or ``"autodiff"`` (the naive forward, supports ``jax.jvp``).

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Raises:
      TypeError: non-floating ``x`` or parameters. ValueError: rank 0 ``x``, parameter shapes,
      ``eps <= 0``, unknown ``backward``.
    """
    eps = _check_common(eps, backward)
    x = _checks.check_float_array("x", x)
    _checks.check_ndim("x", x, min_ndim=1, what="features on the last axis")
    lay = _layout.layout(x.shape, "layer")
    return _apply(x, gamma, beta, lay, eps, backward)


def prepare(x, gamma, beta, lay, eps, backward):
    """Checks the parameters against the layout; returns the core's inputs in its view."""
    gamma = check_param("gamma", gamma, lay)
    beta = check_param("beta", beta, lay).astype(gamma.dtype)
    config = Config(stat_axes=lay.stat_axes, eps=eps, backward=backward)
    return (x.reshape(lay.view), gamma.reshape(lay.param_view), beta.reshape(lay.param_view),
            config)


def _apply(x, gamma, beta, lay, eps, backward):
    return normalize(*prepare(x, gamma, beta, lay, eps, backward))[0].reshape(lay.shape)


def group_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array, *, groups: int,
               eps: float = 1e-5, layout: str = "NCHW", backward: str = "alt") -> jax.Array:
    r"""Group normalization of image data: each example's channels split into ``groups``.

    The default layout is ``"NCHW"``; for Flax/Equinox-style ``(N, H, W, C)`` data pass
    ``layout="NHWC"``. A wrong layout is caught by the parameter shapes (the error names the fix)
    unless C == H, which nothing can tell apart: pass ``layout`` explicitly for such data.

    The ``C`` channels of each example are split into ``groups`` contiguous groups of ``C / G``
    channels; each (example, group) is normalized over its ``C/G x H x W`` values, then scaled and
    shifted per channel. ``groups=1`` is layer norm over (C, H, W); ``groups=C`` is instance norm.

    Shapes: ``N`` batch, ``C`` channels, ``H, W`` height and width, ``G`` groups; ``x`` is
    ``(N, C, H, W)`` (``layout="NCHW"``) or ``(N, H, W, C)`` (``"NHWC"``); ``gamma``/``beta`` ``(C,)``.

    Args:
      x: rank-4 input, floating.
      gamma: per-channel scale, ``(C,)``.
      beta: per-channel shift, ``(C,)``.
      groups: number of groups ``G``, a positive divisor of ``C``.
      eps: added to the variance, > 0.
      layout: ``"NCHW"`` or ``"NHWC"``.
      backward: as in :func:`layer_norm`.

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Raises:
      TypeError: non-floating input, non-int ``groups``. ValueError: rank, parameter shapes,
      ``groups`` not a positive divisor of ``C``, unknown ``layout``/``backward``, ``eps <= 0``.
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
    return _apply(x, gamma, beta, lay, eps, backward)
