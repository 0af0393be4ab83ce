"""The normalization core shared by batch norm, spatial batch norm, layer norm and group norm.

All four compute ``y = gamma * (x - mean) * inv_std + beta`` with ``inv_std = 1 / sqrt(var + eps)``
and statistics over some axes of ``x``; they differ only in which axes the statistics reduce over
(``stat_axes``) and along which axes ``gamma``/``beta`` vary. The public functions reshape their
parameters to broadcast against ``x`` and call :func:`normalize`, which dispatches to the hand-written
``custom_vjp`` (``"alt"`` or ``"graph"``) or to the naive forward in :mod:`jaxbn.reference`
(``"autodiff"``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn import _native
from jaxbn._checks import stat_dtype

BACKWARDS = ("alt", "graph", "autodiff")
# With a mask or axis_name the statistics are joined between two local rules (see
# _split_normalize); the staged "graph" rule needs the whole batch in one place.
SPLIT_BACKWARDS = ("alt", "autodiff")


class AxisGroups(NamedTuple):
    """A mapped axis split into device subgroups (``lax.psum``'s ``axis_index_groups``): each
    subgroup is one batch of its own (as Flax's and Haiku's batch norm do)."""

    name: Any
    groups: tuple[tuple[int, ...], ...]


def psum(a: Any, axis_name: Any) -> Any:
    """``lax.psum`` over ``axis_name``, a name, a tuple of names or :class:`AxisGroups`."""
    if isinstance(axis_name, AxisGroups):
        return jax.lax.psum(a, axis_name.name, axis_index_groups=axis_name.groups)
    return jax.lax.psum(a, axis_name)


def _sum(a: jax.Array, axes: tuple[int, ...], axis_name: Any = None) -> jax.Array:
    total = jnp.sum(a, axis=axes, keepdims=True)
    return total if axis_name is None else psum(total, axis_name)


def _count(shape: tuple[int, ...], axes: tuple[int, ...], axis_name: Any = None) -> Any:
    count = 1
    for a in axes:
        count *= shape[a]
    return count if axis_name is None else count * psum(1, axis_name)


class Config(NamedTuple):
    """Static configuration of one normalization, passed through ``nondiff_argnums``."""

    stat_axes: tuple[int, ...]  # axes of x the statistics reduce over
    eps: float
    backward: str  # "alt" or "graph": which hand-written rule the custom_vjp runs
    axis_name: Any = None  # mapped axis name(s) the statistics are also taken across


class Residuals(NamedTuple):
    """What the forward keeps for the backward: one array the size of x, the rest per-feature."""

    x: jax.Array  # input, in its own dtype (x_hat is recomputed, never stored)
    mean: jax.Array  # batch mean, stat dtype, size 1 along stat_axes
    inv_std: jax.Array  # 1 / sqrt(var + eps), same shape as mean
    gamma: jax.Array  # scale, broadcastable to x


def normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array, config: Config,
              mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(y, mean, var)``; ``gamma``/``beta`` must already broadcast against ``x``.

    ``mean`` and ``var`` are the batch statistics (float32 or wider) with the reduced axes kept as
    size 1. Only ``y`` is differentiable under the hand-written rules: the statistics feed the
    running averages, which carry no gradient. ``mask`` (boolean, broadcastable to ``x``) selects
    the valid entries; the others are padding (see :func:`_split_normalize`).

    Without ``mask`` and ``config.axis_name`` the fused ``custom_vjp`` runs (:func:`alt_rule` or
    :func:`graph_rule`); with either, :func:`_split_normalize`. ``"autodiff"`` runs the naive
    forward of :mod:`jaxbn.reference` (the one place the implementation calls the oracle).
    """
    if config.backward == "autodiff":
        from jaxbn import reference  # the oracle, imported only where it is the computation
        return reference.normalize(x, gamma, beta, config.stat_axes, config.eps, config.axis_name,
                                   mask)
    gamma, beta = vary_like(gamma, x), vary_like(beta, x)
    if config.axis_name is None and mask is None:
        return _reverse_mode_only(_normalize_core, x, gamma, beta, config)
    if config.backward not in SPLIT_BACKWARDS:
        raise ValueError(
            f"backward={config.backward!r} is not available with mask= or axis_name=: that path "
            f"joins the statistics between two local hand-written rules and supports backward="
            + " or ".join(repr(b) for b in SPLIT_BACKWARDS) + ".")
    return _reverse_mode_only(_split_normalize, x, gamma, beta, config, mask)


_FORWARD_MODE_ERROR = (
    "jax.jvp / jax.jacfwd cannot run through jaxbn's hand-written backward rules (backward='alt' "
    "and 'graph' are custom_vjp rules: reverse mode only). Pass backward='autodiff' for "
    "forward-mode differentiation (it differentiates the naive forward); reverse mode (jax.grad, "
    "jax.vjp, jax.hessian) works with every rule.")


def _reverse_mode_only(fn, *args):
    """Calls ``fn`` (a ``custom_vjp``); under forward-mode autodiff, raises an error that says how
    to get forward mode instead of JAX's generic one (which ``jit`` defers to lowering)."""
    # With direct linearization (JAX's default), reverse mode traces with LinearizeTracers and
    # only jax.jvp puts a JVPTracer on top; under jit JAX's own error would come too late.
    direct = getattr(jax.config, "jax_use_direct_linearize", False)
    if direct and any(type(a).__name__ == "JVPTracer" for a in args[:3]):
        raise TypeError(_FORWARD_MODE_ERROR)
    try:
        return fn(*args)
    except TypeError as e:
        if "forward-mode autodiff (jvp)" not in str(e):
            raise
        raise TypeError(_FORWARD_MODE_ERROR) from None


def vary_like(a: jax.Array, x: jax.Array) -> jax.Array:
    """Under ``shard_map``, marks ``a`` as varying over the mesh axes ``x`` varies over.

    A hand-written backward returns per-device cotangents; shard_map's type check requires them to
    vary like their primal, and the transpose of this cast (a psum) then sums them across devices.
    Outside shard_map nothing varies and ``a`` is returned as it is.
    """
    missing = tuple(sorted(_varying_axes(x) - _varying_axes(a)))
    if not missing:
        return a
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(a, missing, to="varying")
    return jax.lax.pvary(a, missing)  # JAX < 0.8 spells the same cast pvary


def _varying_axes(a: jax.Array) -> frozenset:
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; earlier versions: aval.vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def statistics(x: jax.Array, config: Config,
               dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Batch ``(mean, var, inv_std)`` over ``config.stat_axes`` in ``dtype``, reduced axes kept."""
    xs = x.astype(dtype)
    count = _count(x.shape, config.stat_axes, config.axis_name)
    mean = _sum(xs, config.stat_axes, config.axis_name) / count
    # Two passes: E[(x - mean)^2] does not cancel when |mean| >> std, unlike E[x^2] - mean^2.
    var = _sum(jnp.square(xs - mean), config.stat_axes, config.axis_name) / count
    return mean, var, jax.lax.rsqrt(var + config.eps)


def scale_shift(x: jax.Array, mean: jax.Array, inv_std: jax.Array, gamma: jax.Array,
                beta: jax.Array) -> jax.Array:
    """``gamma * (x - mean) * inv_std + beta`` in the statistics' dtype, returned in x's."""
    dtype = mean.dtype
    # (mean - x), not (x - mean): XLA would merge an identical x - mean here with the one inside a
    # reduction and write it to memory in full; a distinct expression keeps every pass fused.
    y = (mean - x.astype(dtype)) * -(inv_std * gamma.astype(dtype)) + beta.astype(dtype)
    return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_core(x, gamma, beta, config):
    return _normalize_core_fwd(x, gamma, beta, config)[0]


def _normalize_core_fwd(x, gamma, beta, config):
    if _native.applies(x, gamma, beta, config):  # the same computation in one C++ kernel
        y, mean, var = _native.forward(x, gamma, beta, config)
        inv_std = jax.lax.rsqrt(var + config.eps)
    else:
        mean, var, inv_std = statistics(x, config, stat_dtype(x.dtype, gamma.dtype, beta.dtype))
        y = scale_shift(x, mean, inv_std, gamma, beta)
    return (y, mean, var), Residuals(x, mean, inv_std, gamma)


def _normalize_core_bwd(config, residuals, cotangents):
    """Dispatches to the rule ``config.backward`` names; see :func:`alt_rule`, :func:`graph_rule`.

    The cotangents of the returned statistics are ignored: they only feed the running statistics,
    which the public functions wrap in ``stop_gradient``.
    """
    dy = cotangents[0]
    if _native.applies(residuals.x, residuals.gamma, residuals.gamma, config):
        x, mean, inv_std, gamma = residuals
        dx, dgamma, dbeta = _native.backward(x, dy, mean, inv_std, gamma, config)
    else:
        rule = alt_rule if config.backward == "alt" else graph_rule
        dx, dgamma, dbeta = rule(config, residuals, dy)
    return dx, dgamma, dbeta.astype(dgamma.dtype)


_normalize_core.defvjp(_normalize_core_fwd, _normalize_core_bwd)


def normalize_with(x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                   var: jax.Array, eps: float) -> jax.Array:
    """``gamma * (x - mean) / sqrt(var + eps) + beta`` with given statistics (test mode).

    All arguments broadcast against ``x``; the arithmetic runs in float32 or wider and ``y`` keeps
    ``x``'s dtype. Plain ``jnp``: its derivative is JAX's.
    """
    dtype = stat_dtype(x.dtype, gamma.dtype, mean.dtype)
    scale = jax.lax.rsqrt(var.astype(dtype) + eps) * gamma.astype(dtype)
    y = (x.astype(dtype) - mean.astype(dtype)) * scale + beta.astype(dtype)
    return y.astype(x.dtype)


def _param_axes(x: jax.Array, gamma: jax.Array) -> tuple[int, ...]:
    """Axes that ``gamma`` broadcasts along: the ones its gradient sums over."""
    return tuple(a for a in range(x.ndim) if gamma.shape[a] == 1 and x.shape[a] != 1)


def alt_rule(config: Config, residuals: Residuals,
             dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The simplified closed-form backward (cs231n's ``batchnorm_backward_alt``).

    With ``m`` values per statistic, ``x_hat = (x - mean) * inv_std`` and ``g = dy * gamma``
    (the gradient with respect to ``x_hat``), differentiating ``mean = sum(x) / m`` and
    ``var = sum((x - mean)^2) / m`` gives ``d x_hat_j / d x_i = inv_std * (delta_ij - 1/m -
    x_hat_i x_hat_j / m)``, hence::

        dx     = inv_std / m * (m * g - sum(g) - x_hat * sum(g * x_hat))
        dgamma = sum(dy * x_hat)          # over the axes gamma broadcasts along
        dbeta  = sum(dy)

    Sums in ``dx`` run over the statistics' axes of the local batch (with ``axis_name`` or a mask,
    :func:`_split_normalize` runs instead). In batch norm gamma
    is constant over those axes, so ``sum(g) = gamma * dbeta`` and ``sum(g * x_hat) = gamma *
    dgamma``, and dx reads ``(gamma * inv_std / m) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``:
    both reductions come out of the one pass that also yields dgamma and dbeta.
    """
    x, mean, inv_std, gamma = residuals
    dtype = mean.dtype
    count = _count(x.shape, config.stat_axes, config.axis_name)
    dy32 = dy.astype(dtype)
    gamma32 = gamma.astype(dtype)
    # The reductions read x - mean; dx below uses mean - x (see _normalize_core_fwd for why).
    xmu = x.astype(dtype) - mean
    param_axes = _param_axes(x, gamma)
    dbeta = jnp.sum(dy32, axis=param_axes, keepdims=True)
    if set(param_axes) == set(config.stat_axes):
        # Batch norm: inv_std is constant over the summed axes and factors out.
        dgamma = jnp.sum(dy32 * xmu, axis=param_axes, keepdims=True) * inv_std
        sum_g, sum_g_xhat = gamma32 * dbeta, gamma32 * dgamma
    else:
        dgamma = jnp.sum(dy32 * xmu * inv_std, axis=param_axes, keepdims=True)
        g = dy32 * gamma32
        sum_g = _sum(g, config.stat_axes, config.axis_name)
        sum_g_xhat = _sum(g * xmu, config.stat_axes, config.axis_name) * inv_std
    # dx = gamma * inv_std * dy - inv_std / m * (sum_g + x_hat * sum_g_xhat)
    dx = ((gamma32 * inv_std) * dy32 - (inv_std / count) * sum_g
          + (inv_std * inv_std / count * sum_g_xhat) * (mean - x.astype(dtype)))
    return dx.astype(x.dtype), dgamma.astype(gamma.dtype), dbeta


def graph_rule(config: Config, residuals: Residuals,
               dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The staged backward: the forward graph walked node by node (cs231n's ``batchnorm_backward``).

    Forward graph, with sums over the statistics' axes and ``m`` values per statistic::

        mu = sum(x) / m;  xmu = x - mu;  var = sum(xmu^2) / m;  sqrtvar = sqrt(var + eps)
        ivar = 1 / sqrtvar;  x_hat = xmu * ivar;  y = gamma * x_hat + beta

    Backward, one node at a time in reverse (the two paths into ``xmu`` and into ``x`` add)::

        dbeta = sum(dy);  dgamma = sum(dy * x_hat);  dx_hat = dy * gamma
        divar = sum(dx_hat * xmu);  dxmu1 = dx_hat * ivar
        dsqrtvar = -divar / sqrtvar^2;  dvar = 0.5 * dsqrtvar / sqrtvar
        dxmu2 = 2 * xmu * dvar / m;  dx1 = dxmu1 + dxmu2
        dmu = -sum(dx1);  dx = dx1 + dmu / m
    """
    x, mean, inv_std, gamma = residuals
    dtype = mean.dtype
    count = _count(x.shape, config.stat_axes, config.axis_name)
    dy32 = dy.astype(dtype)
    param_axes = _param_axes(x, gamma)
    xmu = x.astype(dtype) - mean
    ivar = inv_std
    sqrtvar = 1.0 / inv_std
    x_hat = xmu * ivar
    dbeta = jnp.sum(dy32, axis=param_axes, keepdims=True)
    dgamma = jnp.sum(dy32 * x_hat, axis=param_axes, keepdims=True)
    dx_hat = dy32 * gamma.astype(dtype)
    divar = _sum(dx_hat * xmu, config.stat_axes, config.axis_name)
    dxmu1 = dx_hat * ivar
    dsqrtvar = -divar / jnp.square(sqrtvar)
    dvar = 0.5 * dsqrtvar / sqrtvar
    dxmu2 = 2.0 * xmu * dvar / count
    dx1 = dxmu1 + dxmu2
    dmu = -_sum(dx1, config.stat_axes, config.axis_name)
    dx = dx1 + dmu / count
    return dx.astype(x.dtype), dgamma.astype(gamma.dtype), dbeta


# ---------------------------------------------------------------------------------------------
# Masked statistics and statistics across mapped axes.
#
# JAX cannot run a collective inside a custom_vjp backward under vmap (the axis name is unbound
# when the backward is traced), so the cross-device reductions stay outside the hand-written rules:
# two local custom_vjp pieces, joined by plain lax.psum. The transpose of psum is psum, so the two
# per-feature sums of the backward (of dy * gamma and of dy * gamma * x_hat) are reduced across the
# mapped axes by JAX, under vmap, shard_map and pmap alike.


def _split_normalize(x, gamma, beta, config, mask):
    """``y`` from statistics over the valid entries of the global batch.

    With ``v`` the valid entries (all of them without a mask), ``x_v = where(v, x, 0)`` and
    ``n = psum(count(v))``::

        mean = psum(sum(x_v)) / n
        var  = psum(_centered_square_sum(x_v, mean, v)) / n       # sum over v of (x - mean)^2
        y    = where(v, _affine_core(x_v, gamma, beta, mean, rsqrt(var + eps)), 0)

    A mask *selects*: masked-out entries are replaced by 0 before any arithmetic, so whatever they
    hold (NaN, inf, 1e30) reaches neither the statistics nor a gradient; their output and their
    own gradient are 0. A feature with no valid entry gets mean 0 and variance 0, never NaN.
    """
    dtype = stat_dtype(x.dtype, gamma.dtype, beta.dtype)
    axes, axis_name = config.stat_axes, config.axis_name
    if mask is None:
        count = _count(x.shape, axes, axis_name)
    else:
        # Batch norm's mask is constant along the features; layer/group norm's may vary anywhere.
        unit = _unit_params(x.shape, gamma.shape)
        mask = jnp.broadcast_to(mask, jnp.broadcast_shapes(mask.shape, unit))
        count = _sum(mask.astype(dtype), axes, axis_name)
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    safe_count = jnp.maximum(count, 1)
    mean = _sum(x.astype(dtype), axes, axis_name) / safe_count
    # The rules see the statistics as device-varying (see vary_like); the returned ones stay global.
    square_sum = _centered_square_sum(x, vary_like(mean, x), mask, axes)
    if axis_name is not None:
        square_sum = psum(square_sum, axis_name)
    var = square_sum / safe_count
    inv_std = jax.lax.rsqrt(var + config.eps)
    y = _affine_core(x, gamma, beta, vary_like(mean, x), vary_like(inv_std, x), axes)
    if mask is not None:
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y, mean, var


def _unit_params(x_shape, param_shape):
    """x's shape with size 1 where the parameters vary (a batch norm mask's full shape)."""
    return tuple(1 if p != 1 else n for n, p in zip(x_shape, param_shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _centered_square_sum(x, mean, mask, stat_axes):
    return _centered_square_sum_fwd(x, mean, mask, stat_axes)[0]


def _centered(x, mean, mask):
    xmu = x.astype(mean.dtype) - mean
    return xmu if mask is None else jnp.where(mask, xmu, 0)


def _centered_square_sum_fwd(x, mean, mask, stat_axes):
    xmu = _centered(x, mean, mask)
    return jnp.sum(xmu * xmu, axis=stat_axes, keepdims=True), (x, mean, mask)


def _centered_square_sum_bwd(stat_axes, residuals, ct):
    """``q = sum over the valid entries of (x - mean)^2`` (local): ``dx = 2 (x - mean) ct`` on
    the valid entries and 0 elsewhere, ``dmean = -2 ct sum(x - mean)``; the mask is data."""
    x, mean, mask = residuals
    xmu = _centered(x, mean, mask)
    dx = (2.0 * ct * xmu).astype(x.dtype)
    dmean = -2.0 * ct * jnp.sum(xmu, axis=stat_axes, keepdims=True)
    return dx, dmean, None


_centered_square_sum.defvjp(_centered_square_sum_fwd, _centered_square_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _affine_core(x, gamma, beta, mean, inv_std, stat_axes):
    return _affine_core_fwd(x, gamma, beta, mean, inv_std, stat_axes)[0]


def _affine_core_fwd(x, gamma, beta, mean, inv_std, stat_axes):
    dtype = mean.dtype
    y = (x.astype(dtype) - mean) * (inv_std * gamma.astype(dtype)) + beta.astype(dtype)
    return y.astype(x.dtype), Residuals(x, mean, inv_std, gamma)


def _affine_core_bwd(stat_axes, residuals, dy):
    """``y = gamma * (x - mean) * inv_std + beta`` with the statistics as inputs (local sums)::

        g = dy * gamma;  dx = g * inv_std
        dmean = -inv_std * sum(g);  dinv_std = sum(g * (x - mean))      # over the statistics' axes
        dgamma = sum(dy * x_hat);  dbeta = sum(dy)                       # over gamma's broadcast axes

    Sums run over the local batch; the psum around the statistics completes them across devices.
    """
    x, mean, inv_std, gamma = residuals
    dtype = mean.dtype
    dy32 = dy.astype(dtype)
    xmu = x.astype(dtype) - mean
    g = dy32 * gamma.astype(dtype)
    param_axes = _param_axes(x, gamma)
    dgamma = jnp.sum(dy32 * xmu * inv_std, axis=param_axes, keepdims=True)
    dbeta = jnp.sum(dy32, axis=param_axes, keepdims=True)
    dmean = -inv_std * jnp.sum(g, axis=stat_axes, keepdims=True)
    dinv_std = jnp.sum(g * xmu, axis=stat_axes, keepdims=True)
    dx = (g * inv_std).astype(x.dtype)
    return dx, dgamma.astype(gamma.dtype), dbeta.astype(gamma.dtype), dmean, dinv_std


_affine_core.defvjp(_affine_core_fwd, _affine_core_bwd)
