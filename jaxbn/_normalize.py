"""The normalization core shared by batch norm, spatial batch norm, layer norm and group norm.

All four compute ``y = gamma * (x - mean) * inv_std + beta`` with the formulas of
:mod:`jaxbn._rules`, on the layout's view of ``x``; they differ only in the :class:`Config` the
layout seam produced (:func:`configure`, once per call). :func:`normalize` dispatches:

- ``"alt"``/``"graph"`` without ``mask`` or ``axis_name``: one fused ``custom_vjp``
  (:func:`_normalize_core`), computed by the native CPU kernels when the config says so;
- with ``mask`` or ``axis_name``: the statistics joined by ``lax.psum`` between two local
  hand-written rules (:func:`_joined`);
- ``"autodiff"``: the same formulas differentiated by JAX (the oracle in
  :mod:`jaxbn.reference` is never called by the implementation).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _native
from jaxbn._checks import real_dtype, stat_dtype
from jaxbn._layout import Layout
from jaxbn._rules import (
    Config,
    Residuals,
    alt_rule,
    centered,
    centered_square_sum,
    epilogue_cotangent,
    graph_rule,
    param_cotangent,
    scale_shift,
    statistics,
    vary_like,
)

BACKWARDS = ("alt", "graph", "autodiff")
# With a mask or axis_name the statistics are joined between two local rules (see _joined); the
# staged "graph" rule needs the whole batch in one place.
SPLIT_BACKWARDS = ("alt", "autodiff")


def configure(lay: Layout, *, eps: float, backward: str, x_dtype: Any, param_dtype: Any,
              axis_name: Any = None, masked: bool = False, kernels: bool = True,
              x_type: Any = None, activation: str | None = None,
              residual: bool = False) -> Config:
    """The core's static config for one call: the layout's axes, the epilogue (``activation``,
    ``residual``), and whether the native kernels compute it (decided here, once; the forward
    and the backward both read it).

    ``kernels=False`` keeps the call on the jnp rules (batch renormalization has its own rule);
    ``x_type`` (``jax.typeof(x)``) lets the decision see x's sharding.
    """
    native = None
    if (kernels and backward == "alt" and axis_name is None and not masked
            and _native.decide(lay.native_view, x_dtype, param_dtype, x_type)):
        native = lay.feature_axis
    return Config(lay.stat_axes, lay.grad_axes, eps, backward, axis_name, native, activation,
                  residual)


def normalize(x: jax.Array, gamma: jax.Array, beta: jax.Array, config: Config,
              mask: jax.Array | None = None,
              residual: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Returns ``(y, mean, var)``; ``gamma``/``beta`` must already broadcast against ``x``.

    ``y = act(gamma * x_hat + beta + residual)`` with the epilogue the config names
    (``config.activation``; ``residual``, of x's shape and dtype, where ``config.residual``):
    inside the same ``custom_vjp`` as the normalization, whose backward masks ``dy`` by
    ``y > 0`` and hands the residual that masked cotangent.

    ``mean`` and ``var`` are the batch statistics (float32 or wider) with the reduced axes kept as
    size 1. Only ``y`` is differentiable under the hand-written rules: the statistics feed the
    running averages, which carry no gradient. ``mask`` (boolean, broadcastable to ``x``) selects
    the valid entries; the others are padding (see :func:`_joined`).
    """
    gamma, beta = vary_like(gamma, x), vary_like(beta, x)
    if config.backward == "autodiff":
        return _joined(x, gamma, beta, config, mask, residual, custom=False)
    if config.axis_name is None and mask is None:
        return reverse_mode_only(_normalize_core, x, gamma, beta, residual, config)
    if config.backward not in SPLIT_BACKWARDS:
        raise ValueError(
            f"backward={config.backward!r} is not available with mask= or axis_name=: that path "
            f"joins the statistics between two local hand-written rules and supports backward="
            + " or ".join(repr(b) for b in SPLIT_BACKWARDS) + ".")
    return reverse_mode_only(_joined, x, gamma, beta, config, mask, residual, True)


_FORWARD_MODE_ERROR = (
    "jax.jvp / jax.jacfwd cannot run through jaxbn's hand-written backward rules (backward='alt' "
    "and 'graph' are custom_vjp rules: reverse mode only). Pass backward='autodiff' for "
    "forward-mode differentiation (it differentiates the plain forward); reverse mode (jax.grad, "
    "jax.vjp, jax.hessian) works with every rule.")


def reverse_mode_only(fn, *args):
    """Calls ``fn`` (built on ``custom_vjp``); under forward-mode autodiff, raises an error that
    says how to get forward mode instead of JAX's generic one (which ``jit`` defers to
    lowering)."""
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _normalize_core(x, gamma, beta, residual, config):
    return _normalize_core_fwd(x, gamma, beta, residual, config)[0]


def _normalize_core_fwd(x, gamma, beta, residual, config):
    if config.native is not None:  # the same computation in one C++ kernel
        y, mean, var, inv_std, *low = _native.forward(x, gamma, beta, residual, config)
        low = tuple(low)
    else:
        mean, var = statistics(x, config, stat_dtype(x.dtype, gamma.dtype, beta.dtype))
        inv_std = jax.lax.rsqrt(var + config.eps)
        y = scale_shift(x, mean, inv_std, gamma, beta, residual, config.activation)
        low = None
    out = None if config.activation is None else y
    return (y, mean, var), Residuals(x, mean, inv_std, gamma, out, low)


def _normalize_core_bwd(config, residuals, cotangents):
    """Runs the rule ``config.backward`` names (:func:`jaxbn._rules.alt_rule` or
    :func:`~jaxbn._rules.graph_rule`), natively where the forward ran natively, on the
    cotangent of the affine output: ``dz = dy * [y > 0]`` after a ReLU
    (:func:`jaxbn._rules.epilogue_cotangent`), which is also the residual's.

    The cotangents of the returned statistics are ignored: they only feed the running statistics,
    which the public functions wrap in ``stop_gradient``.
    """
    dy = cotangents[0]
    if config.native is not None:
        dx, dgamma, dbeta, dz = _native.backward(dy, residuals, config)
    else:
        dz = epilogue_cotangent(config, residuals.out, dy)
        rule = alt_rule if config.backward == "alt" else graph_rule
        dx, dgamma, dbeta = rule(config, residuals, dz)
    dresidual = dz.astype(residuals.x.dtype) if config.residual else None
    return dx, dgamma, dbeta.astype(dgamma.dtype), dresidual


_normalize_core.defvjp(_normalize_core_fwd, _normalize_core_bwd)


def normalize_with(x: jax.Array, gamma: jax.Array, beta: jax.Array, mean: jax.Array,
                   var: jax.Array, eps: float, residual: jax.Array | None = None,
                   activation: str | None = None) -> jax.Array:
    """``act(gamma * (x - mean) / sqrt(var + eps) + beta + residual)`` with given statistics
    (test mode).

    All arguments broadcast against ``x``; the arithmetic runs in float32 or wider and ``y`` keeps
    ``x``'s dtype. Plain ``jnp``: its derivative is JAX's.
    """
    dtype = stat_dtype(x.dtype, gamma.dtype, mean.dtype)
    inv_std = jax.lax.rsqrt(var.astype(real_dtype(dtype)) + eps)
    return scale_shift(x, mean.astype(dtype), inv_std, gamma, beta, residual, activation)


# ---------------------------------------------------------------------------------------------
# Masked statistics and statistics across mapped axes.
#
# JAX cannot run a collective inside a custom_vjp backward under vmap (the axis name is unbound
# when the backward is traced), so the cross-device reductions stay outside the hand-written rules:
# two local custom_vjp pieces, joined by plain lax.psum. The transpose of psum is psum, so the two
# per-feature sums of the backward (of dy * gamma and of dy * gamma * x_hat) are reduced across the
# mapped axes by JAX, under vmap, shard_map and pmap alike.


def _joined(x, gamma, beta, config, mask, residual, custom):
    """``y`` from statistics over the valid entries of the global batch.

    With ``v`` the valid entries (all of them without a mask), the formulas of
    :func:`jaxbn._rules.statistics` and :func:`~jaxbn._rules.scale_shift`::

        mean, var = statistics(where(v, x, 0))     # sums joined by psum across axis_name
        y = where(v, scale_shift(x, mean, rsqrt(var + eps), gamma, beta, residual, act), 0)

    A mask *selects*: masked-out entries are replaced by 0 before any arithmetic, so whatever they
    hold (NaN, inf, 1e30) reaches neither the statistics nor a gradient; their output and their
    own gradient are 0. A feature with no valid entry gets mean 0 and variance 0, never NaN.
    ``custom=True`` computes the local pieces with hand-written rules (:func:`_centered_square_sum`,
    :func:`_affine_core`: one residual the size of x); ``custom=False`` leaves them to JAX
    (``backward="autodiff"``).
    """
    dtype = stat_dtype(x.dtype, gamma.dtype, beta.dtype)
    if mask is not None:
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    square_sum = _centered_square_sum if custom else centered_square_sum
    mean, var = statistics(x, config, dtype, mask, square_sum)
    # The local pieces see the statistics as device-varying (see vary_like); the returned ones
    # stay global.
    mean_local = vary_like(mean, x)
    inv_std = vary_like(jax.lax.rsqrt(var + config.eps), x)
    if custom:
        y = _affine_core(x, gamma, beta, mean_local, inv_std, residual, config)
    else:
        y = scale_shift(x, mean_local, inv_std, gamma, beta, residual, config.activation)
    if mask is not None:
        y = jnp.where(mask, y, jnp.zeros((), y.dtype))
    return y, mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _centered_square_sum(x, mean, mask, stat_axes):
    return centered_square_sum(x, mean, mask, stat_axes)


def _centered_square_sum_fwd(x, mean, mask, stat_axes):
    return centered_square_sum(x, mean, mask, stat_axes), (x, mean, mask)


def _centered_square_sum_bwd(stat_axes, residuals, ct):
    """``q = sum over the valid entries of |x - mean|^2`` (local): ``dx = 2 conj(x - mean) ct``
    on the valid entries and 0 elsewhere, ``dmean = -2 ct sum(conj(x - mean))``; the mask is
    data. (For real x, ``conj`` is the identity.)"""
    x, mean, mask = residuals
    xmu = jnp.conj(centered(x, mean, mask))
    dx = (2.0 * ct * xmu).astype(x.dtype)
    dmean = -2.0 * ct * jnp.sum(xmu, axis=stat_axes, keepdims=True)
    return dx, dmean, None


_centered_square_sum.defvjp(_centered_square_sum_fwd, _centered_square_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _affine_core(x, gamma, beta, mean, inv_std, residual, config):
    return _affine_core_fwd(x, gamma, beta, mean, inv_std, residual, config)[0]


def _affine_core_fwd(x, gamma, beta, mean, inv_std, residual, config):
    y = scale_shift(x, mean, inv_std, gamma, beta, residual, config.activation)
    out = None if config.activation is None else y
    return y, Residuals(x, mean, inv_std, gamma, out)


def _affine_core_bwd(config, residuals, dy):
    """``y = act(gamma * (x - mean) * inv_std + beta + residual)`` with the statistics as
    inputs (local sums); with ``dy`` replaced by ``dz`` (:func:`jaxbn._rules.epilogue_cotangent`,
    also the residual's cotangent)::

        g = dy * gamma;  dx = g * inv_std
        dmean = -inv_std * sum(g);  dinv_std = sum(g * (x - mean))   # over the statistics' axes
        dgamma = sum(dy * x_hat);  dbeta = sum(dy)                    # over gamma's broadcast axes

    For complex x the real ``inv_std`` takes the real part of its sum, and so do real gamma and
    beta (:func:`jaxbn._rules.param_cotangent`). Sums run over the local batch; the psum around
    the statistics completes them across devices.
    """
    x, mean, inv_std, gamma, out, _ = residuals
    dy = epilogue_cotangent(config, out, dy)
    dresidual = dy.astype(x.dtype) if config.residual else None
    dtype = mean.dtype
    dy32 = dy.astype(dtype)
    xmu = x.astype(dtype) - mean
    g = dy32 * gamma.astype(dtype)
    dgamma = jnp.sum(dy32 * xmu * inv_std, axis=config.grad_axes, keepdims=True)
    dbeta = jnp.sum(dy32, axis=config.grad_axes, keepdims=True)
    dmean = -inv_std * jnp.sum(g, axis=config.stat_axes, keepdims=True)
    dinv_std = jnp.sum(jnp.real(g * xmu), axis=config.stat_axes, keepdims=True)
    dx = (g * inv_std).astype(x.dtype)
    return (dx, param_cotangent(dgamma, gamma.dtype), param_cotangent(dbeta, gamma.dtype), dmean,
            dinv_std, dresidual)


_affine_core.defvjp(_affine_core_fwd, _affine_core_bwd)
