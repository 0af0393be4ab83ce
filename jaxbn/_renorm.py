"""Batch renormalization (Ioffe, 2017): batch norm corrected towards the running statistics.

In train mode, with ``sigma = sqrt(var + eps)`` for the batch and for the running statistics::

    r = clip(sigma_B / sigma_running, 1 / r_max, r_max)
    d = clip((mu_B - mu_running) / sigma_running, -d_max, d_max)
    y = gamma * (x_hat * r + d) + beta

with ``r`` and ``d`` held constant for the gradient, as in the paper. ``r_max = 1, d_max = 0``
is plain batch norm, to the bit. Test mode and the running-statistics update are batch norm's.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn._checks import stat_dtype
from jaxbn._normalize import reverse_mode_only
from jaxbn._rules import Config, Residuals, alt_rule, graph_rule, scale_shift, statistics


def check_renorm(renorm: Any, *, mask: Any, axis_name: Any, layout: Any):
    """``renorm=dict(r_max=..., d_max=...)`` as ``(r_max, d_max)`` arrays, checked where the
    values are concrete (traced values, ramped with the step, are taken as they come)."""
    if renorm is None:
        return None
    if not isinstance(renorm, dict) or set(renorm) != {"r_max", "d_max"}:
        raise TypeError(f"renorm must be a dict with keys 'r_max' and 'd_max' (e.g. "
                        f"dict(r_max=3.0, d_max=5.0)); got {renorm!r}.")
    if mask is not None or axis_name is not None or layout.group_axes:
        raise ValueError("renorm= cannot be combined with mask=, axis_name= or "
                         "virtual_batch_size=: batch renormalization runs on one whole batch.")
    r_max, d_max = renorm["r_max"], renorm["d_max"]
    for name, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, jax.core.Tracer):
            continue
        value = np.asarray(value)
        if value.shape != () or not np.issubdtype(value.dtype, np.number):
            raise TypeError(f"renorm {name} must be a scalar number; got {value!r}.")
        if not float(value) >= low:
            raise ValueError(f"renorm {name} must be >= {low:g}; got {float(value):g}.")
    return jnp.asarray(r_max, jnp.float32), jnp.asarray(d_max, jnp.float32)


def renormalize(x, gamma, beta, running_mean, running_var, r_max, d_max, config: Config):
    """Returns ``(y, mean, var)`` like :func:`jaxbn._normalize.normalize`; every array but
    ``r_max``/``d_max`` is already shaped to broadcast against ``x``.

    ``backward="autodiff"`` differentiates the forward below with JAX (``r``, ``d`` behind
    ``stop_gradient``); ``"alt"``/``"graph"`` run the hand-written rule.
    """
    if config.backward == "autodiff":
        (y, mean, var), _ = _forward(x, gamma, beta, running_mean, running_var, r_max, d_max,
                                     config, jax.lax.stop_gradient)
        return y, mean, var
    return reverse_mode_only(_renorm_core, x, gamma, beta, running_mean, running_var, r_max,
                              d_max, config)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _renorm_core(x, gamma, beta, running_mean, running_var, r_max, d_max, config):
    return _renorm_core_fwd(x, gamma, beta, running_mean, running_var, r_max, d_max, config)[0]


def _renorm_core_fwd(x, gamma, beta, running_mean, running_var, r_max, d_max, config):
    return _forward(x, gamma, beta, running_mean, running_var, r_max, d_max, config,
                    lambda a: a)


def _forward(x, gamma, beta, running_mean, running_var, r_max, d_max, config, hold):
    """``((y, mean, var), residuals)``; ``hold`` is applied to ``r`` and ``d`` (stop_gradient for
    JAX's own differentiation; the hand-written rule treats them as constants anyway)."""
    dtype = stat_dtype(x.dtype, gamma.dtype, beta.dtype)
    mean, var = statistics(x, config, dtype)
    inv_std = jax.lax.rsqrt(var + config.eps)
    inv_sigma_running = jax.lax.rsqrt(running_var.astype(dtype) + config.eps)
    r_max, d_max = r_max.astype(dtype), d_max.astype(dtype)
    r = hold(jnp.clip(inv_sigma_running / inv_std, 1.0 / r_max, r_max))
    d = hold(jnp.clip((mean - running_mean.astype(dtype)) * inv_sigma_running, -d_max, d_max))
    # y = gamma * (x_hat * r + d) + beta = (gamma r) x_hat + (gamma d + beta): batch norm with
    # an effective scale and shift, so the core's forward and backward serve unchanged.
    gamma32 = gamma.astype(dtype)
    scale, shift = gamma32 * r, gamma32 * d + beta.astype(dtype)
    y = scale_shift(x, mean, inv_std, scale, shift)
    # Residuals: x and per-feature vectors only (the small arrays give the cotangents' types).
    return (y, mean, var), (Residuals(x, mean, inv_std, scale), r, d, gamma, running_mean,
                            running_var)


def _renorm_core_bwd(config, residuals, cotangents):
    """With ``r``, ``d`` constant, ``y`` is batch norm with scale ``gamma' = gamma r`` and shift
    ``beta' = gamma d + beta``; the core's rule gives ``dx``, ``dgamma'``, ``dbeta'`` and::

        dx     = (the batch norm backward with gamma')
        dgamma = r * dgamma' + d * dbeta'   # = sum(dy * (x_hat r + d))
        dbeta  = dbeta'                     # = sum(dy)

    The running statistics, ``r_max`` and ``d_max`` get zero cotangents (no gradient flows
    through ``r`` and ``d``).
    """
    core_residuals, r, d, gamma, running_mean, running_var = residuals
    rule = alt_rule if config.backward == "alt" else graph_rule
    dx, dscale, dshift = rule(config, core_residuals, cotangents[0])
    dgamma = (r * dscale.astype(r.dtype) + d * dshift).astype(gamma.dtype)
    return (dx, dgamma, dshift.astype(gamma.dtype), jnp.zeros_like(running_mean),
            jnp.zeros_like(running_var), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))


_renorm_core.defvjp(_renorm_core_fwd, _renorm_core_bwd)
