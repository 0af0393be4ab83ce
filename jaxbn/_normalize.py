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

from jaxbn import reference
from jaxbn._checks import stat_dtype
from jaxbn.reference import _count, _sum

BACKWARDS = ("alt", "graph", "autodiff")


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


def normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array,
              config: Config) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(y, mean, var)``; ``gamma``/``beta`` must already broadcast against ``x``.

    ``mean`` and ``var`` are the batch statistics (float32 or wider) with the reduced axes kept as
    size 1. Only ``y`` is differentiable under the hand-written rules: the statistics feed the
    running averages, which carry no gradient.
    """
    if config.backward == "autodiff":
        return reference.normalize(x, gamma, beta, config.stat_axes, config.eps, config.axis_name)
    return _normalize_core(x, gamma, beta, config)


def _statistics(x: jax.Array, config: Config, dtype: Any) -> tuple[jax.Array, jax.Array]:
    xs = x.astype(dtype)
    count = _count(x.shape, config.stat_axes, config.axis_name)
    mean = _sum(xs, config.stat_axes, config.axis_name) / count
    # Two passes: E[(x - mean)^2] does not cancel when |mean| >> std, unlike E[x^2] - mean^2.
    var = _sum(jnp.square(xs - mean), config.stat_axes, config.axis_name) / count
    return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize_core(x, gamma, beta, config):
    return _normalize_core_fwd(x, gamma, beta, config)[0]


def _normalize_core_fwd(x, gamma, beta, config):
    dtype = stat_dtype(x.dtype, gamma.dtype, beta.dtype)
    mean, var = _statistics(x, config, dtype)
    inv_std = jax.lax.rsqrt(var + config.eps)
    y = (x.astype(dtype) - mean) * (inv_std * gamma.astype(dtype)) + beta.astype(dtype)
    return (y.astype(x.dtype), mean, var), Residuals(x, mean, inv_std, gamma)


def _normalize_core_bwd(config, residuals, cotangents):
    """Dispatches to the rule ``config.backward`` names; see :func:`alt_rule`, :func:`graph_rule`.

    The cotangents of the returned statistics are ignored: they only feed the running statistics,
    which the public functions wrap in ``stop_gradient``.
    """
    dy = cotangents[0]
    rule = alt_rule if config.backward == "alt" else graph_rule
    dx, dgamma, dbeta = rule(config, residuals, dy)
    return dx, dgamma, dbeta.astype(dgamma.dtype)


_normalize_core.defvjp(_normalize_core_fwd, _normalize_core_bwd)


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

    Sums in ``dx`` run over the statistics' axes (and across ``axis_name``). In batch norm gamma
    is constant over those axes, so ``sum(g) = gamma * dbeta`` and ``sum(g * x_hat) = gamma *
    dgamma``, and dx reads ``(gamma * inv_std / m) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``:
    both reductions come out of the one pass that also yields dgamma and dbeta.
    """
    x, mean, inv_std, gamma = residuals
    dtype = mean.dtype
    count = _count(x.shape, config.stat_axes, config.axis_name)
    dy32 = dy.astype(dtype)
    gamma32 = gamma.astype(dtype)
    x_hat = (x.astype(dtype) - mean) * inv_std
    param_axes = _param_axes(x, gamma)
    dbeta = jnp.sum(dy32, axis=param_axes, keepdims=True)
    dgamma = jnp.sum(dy32 * x_hat, axis=param_axes, keepdims=True)
    if set(param_axes) == set(config.stat_axes):
        psum = (lambda a: a) if config.axis_name is None else (
            lambda a: jax.lax.psum(a, config.axis_name))
        sum_g, sum_g_xhat = gamma32 * psum(dbeta), gamma32 * psum(dgamma)
    else:
        g = dy32 * gamma32
        sum_g = _sum(g, config.stat_axes, config.axis_name)
        sum_g_xhat = _sum(g * x_hat, config.stat_axes, config.axis_name)
    dx = (gamma32 * inv_std) * dy32 - (inv_std / count) * (sum_g + x_hat * sum_g_xhat)
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
