"""The normalization's formulas in plain ``jnp``: statistics, the affine output, and the two
hand-written backward rules.

Every normalization computes ``y = gamma * (x - mean) * inv_std + beta`` with
``inv_std = 1 / sqrt(var + eps)`` and statistics over some axes of a view of ``x``. Each formula
is written once, here; :mod:`jaxbn._normalize` assembles them into ``custom_vjp`` rules (and
differentiates them with JAX for ``backward="autodiff"``), and :mod:`jaxbn._native` computes the
same formulas in C++ and uses these as its derivative. This module imports no other part of
jaxbn's core but the argument checks, so both can import it.

Shape legend: the arrays are in the layout's view of ``x``; statistics keep the reduced axes as
size 1, parameters have size 1 along the axes they do not vary along.

Complex ``x`` (batch norm, as Flax defines it): the mean is complex, the variance is real,
``var = mean(|x - mean|^2)``. The rules below hold for both, with ``conj`` and ``real`` (no-ops
on real arrays) where complex values need them; cotangents follow JAX's convention (``jax.grad``
of a real loss ``L`` with respect to ``z = a + ib`` is ``dL/da - i dL/db``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbn._checks import real_dtype


class AxisGroups(NamedTuple):
    """A mapped axis split into device subgroups (``lax.psum``'s ``axis_index_groups``): each
    subgroup is one batch of its own (as Flax's and Haiku's batch norm do)."""

    name: Any
    groups: tuple[tuple[int, ...], ...]


class Config(NamedTuple):
    """Static facts of one normalization call, decided once (``nondiff_argnums``)."""

    stat_axes: tuple[int, ...]  # axes of the view the statistics reduce over
    grad_axes: tuple[int, ...]  # axes of the view gamma and beta broadcast along (their
    #                             gradients sum over these)
    eps: float
    backward: str  # "alt", "graph" or "autodiff"
    axis_name: Any = None  # mapped axis name(s) the statistics are also taken across
    native: int | None = None  # the feature axis when the native kernels compute this call
    #                            (a batch norm over every other axis), else None
    activation: str | None = None  # "relu" or None: applied after the affine (and residual)
    residual: bool = False  # an array of x's shape is added to the affine output


class Residuals(NamedTuple):
    """What the forward keeps for the backward: one array the size of x, the rest per-feature."""

    x: jax.Array  # input, in its own dtype (x_hat is recomputed, never stored)
    mean: jax.Array  # batch mean, stat dtype, size 1 along stat_axes
    inv_std: jax.Array  # 1 / sqrt(var + eps), same shape as mean
    gamma: jax.Array  # scale, broadcastable to x
    out: jax.Array | None = None  # y itself, kept only when an activation follows (its mask is
    #                               y > 0; y is the layer's output, alive anyway)
    low: tuple[jax.Array, jax.Array] | None = None  # native kernels only: what mean and inv_std
    #                               leave out of the forward's float64 ones (jaxbn._native)


def psum(a: Any, axis_name: Any) -> Any:
    """``lax.psum`` over ``axis_name``, a name, a tuple of names or :class:`AxisGroups`."""
    if isinstance(axis_name, AxisGroups):
        return jax.lax.psum(a, axis_name.name, axis_index_groups=axis_name.groups)
    return jax.lax.psum(a, axis_name)


def sum_over(a: jax.Array, axes: tuple[int, ...], axis_name: Any = None) -> jax.Array:
    """The sum over ``axes`` (kept as size 1) and across the mapped axes ``axis_name``."""
    total = jnp.sum(a, axis=axes, keepdims=True)
    return total if axis_name is None else psum(total, axis_name)


def count_over(shape: tuple[int, ...], axes: tuple[int, ...], axis_name: Any = None) -> Any:
    """How many values ``sum_over`` adds up for each statistic."""
    count = 1
    for a in axes:
        count *= shape[a]
    return count if axis_name is None else count * psum(1, axis_name)


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
    return jax.lax.pvary(a, missing)  # type: ignore[attr-defined]  # JAX < 0.8's spelling


def _varying_axes(a: jax.Array) -> frozenset:
    aval = jax.typeof(a)
    manual = getattr(aval, "manual_axis_type", None)  # JAX >= 0.9; earlier versions: aval.vma
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()))


def abs_sq(a: jax.Array) -> jax.Array:
    """``|a|^2``, real: ``a * a`` for real ``a``, ``re(a)^2 + im(a)^2`` for complex ``a``."""
    if not jnp.iscomplexobj(a):
        return a * a
    return jnp.square(jnp.real(a)) + jnp.square(jnp.imag(a))


def param_cotangent(d: jax.Array, dtype: Any) -> jax.Array:
    """A parameter's cotangent in its dtype: the real part for a real parameter of a complex
    normalization (JAX's cotangent of a real input that enters complex arithmetic)."""
    if jnp.iscomplexobj(d) and not jnp.issubdtype(dtype, jnp.complexfloating):
        d = jnp.real(d)
    return d.astype(dtype)


def centered(x: jax.Array, mean: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``x - mean`` in ``mean``'s dtype, 0 where ``mask`` is False."""
    xmu = x.astype(mean.dtype) - mean
    return xmu if mask is None else jnp.where(mask, xmu, jnp.zeros((), xmu.dtype))


def centered_square_sum(x: jax.Array, mean: jax.Array, mask: jax.Array | None,
                        stat_axes: tuple[int, ...]) -> jax.Array:
    """``sum(|x - mean|^2)`` over the valid entries, locally, in ``mean``'s (real) dtype."""
    return jnp.sum(abs_sq(centered(x, mean, mask)), axis=stat_axes, keepdims=True)


def statistics(x: jax.Array, config: Config, dtype: Any, mask: jax.Array | None = None,
               square_sum=centered_square_sum) -> tuple[jax.Array, jax.Array]:
    """Batch ``(mean, var)`` over ``config.stat_axes`` (and ``config.axis_name``) in ``dtype``.

    With ``v`` the valid entries (all of them without ``mask``) and ``n`` their count::

        mean = sum over v of x / n;    var = sum over v of |x - mean|^2 / n

    Two passes: ``E[(x - mean)^2]`` does not cancel when ``|mean| >> std``, unlike
    ``E[x^2] - mean^2``. ``mask`` (boolean, broadcastable to ``x``) selects: the other entries
    are replaced by 0 before any arithmetic, so NaN or inf there reach nothing; a statistic with no
    valid entry is mean 0, variance 0. ``square_sum`` computes the local centered sum (the split
    rules pass a ``custom_vjp`` of :func:`centered_square_sum`). ``dtype`` is the mean's
    (complex for complex ``x``); counts and the variance are in its real dtype.
    """
    axes, axis_name = config.stat_axes, config.axis_name
    if mask is None:
        count = count_over(x.shape, axes, axis_name)
    else:
        # Expanded along the statistics' axes so that it counts every valid value.
        mask = jnp.broadcast_to(mask, tuple(n if a in axes else m for a, (n, m) in
                                            enumerate(zip(x.shape, mask.shape))))
        count = jnp.maximum(sum_over(mask.astype(real_dtype(dtype)), axes, axis_name), 1)
        x = jnp.where(mask, x, jnp.zeros((), x.dtype))
    total_x = sum_over(x.astype(dtype), axes, axis_name)
    mean = total_x / (count if mask is None else count.astype(dtype))
    # The local sum sees the global mean as device-varying (see vary_like).
    total = square_sum(x, vary_like(mean, x), mask, axes)
    var = (total if axis_name is None else psum(total, axis_name)) / count
    return mean, var


ACTIVATIONS = ("relu",)  # the activations an epilogue applies (None: no activation)


def epilogue(z: jax.Array, residual: jax.Array | None, activation: str | None) -> jax.Array:
    """``act(z + residual)`` in ``z``'s dtype: the fused epilogue after the affine (``bn -> add
    -> relu``). Plain ``jnp``: ``jax.nn.relu``'s derivative at 0 is 0, as the rules' mask."""
    if residual is not None:
        z = z + residual.astype(z.dtype)
    if activation == "relu":
        z = jax.nn.relu(z)
    return z


def epilogue_cotangent(config: Config, out: jax.Array | None, dy: jax.Array) -> jax.Array:
    """The cotangent of ``z = gamma * x_hat + beta (+ residual)`` from that of ``y = act(z)``.

    ReLU: ``dz = dy * [z > 0]``, and ``z > 0`` exactly where ``y = relu(z) > 0``, so the mask
    comes from the output the forward kept (no array of its own). The residual's cotangent is
    ``dz`` as well (it enters ``z`` with weight 1).
    """
    if config.activation is None:
        return dy
    assert out is not None, "the forward keeps its output whenever an activation follows"
    return jnp.where(out > 0, dy, jnp.zeros((), dy.dtype))


def scale_shift(x: jax.Array, mean: jax.Array, inv_std: jax.Array, gamma: jax.Array,
                beta: jax.Array, residual: jax.Array | None = None,
                activation: str | None = None) -> jax.Array:
    """``y = act(gamma * (x - mean) * inv_std + beta + residual)`` in the statistics' dtype,
    returned in x's (one rounding): the output's formula, written once."""
    dtype = mean.dtype
    # (mean - x), not (x - mean): XLA would merge an identical x - mean here with the one inside a
    # reduction and write it to memory in full; a distinct expression keeps every pass fused.
    y = (mean - x.astype(dtype)) * -(inv_std * gamma.astype(dtype)) + beta.astype(dtype)
    return epilogue(y, residual, activation).astype(x.dtype)


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

    For complex ``x`` (``var = sum(|x - mean|^2) / m``, real) the same derivation in JAX's
    convention gives ``conj(x_hat) * sum(re(g * x_hat))`` for the last term of ``dx``, and the
    real parts of ``dgamma``/``dbeta`` for real parameters (:func:`param_cotangent`).

    Sums in ``dx`` run over the statistics' axes of the local batch (with ``axis_name`` or a mask
    the split rules of :mod:`jaxbn._normalize` run instead). Where the parameters' gradients sum
    over exactly the statistics' axes (batch norm), gamma is constant over them, so
    ``sum(g) = gamma * dbeta`` and ``sum(g * x_hat) = gamma * dgamma``, and dx reads
    ``(gamma * inv_std / m) * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``: both reductions come
    out of the one pass that also yields dgamma and dbeta.
    """
    x, mean, inv_std, gamma = residuals[:4]
    dtype = mean.dtype
    count = count_over(x.shape, config.stat_axes, config.axis_name)
    dy32 = dy.astype(dtype)
    gamma32 = gamma.astype(dtype)
    # The reductions read x - mean; dx below uses mean - x (see scale_shift for why).
    xmu = x.astype(dtype) - mean
    grad_axes = config.grad_axes
    dbeta = jnp.sum(dy32, axis=grad_axes, keepdims=True)
    if grad_axes == config.stat_axes:
        # Batch norm: inv_std is constant over the summed axes and factors out.
        dgamma = jnp.sum(dy32 * xmu, axis=grad_axes, keepdims=True) * inv_std
        sum_g, sum_g_xhat = gamma32 * dbeta, jnp.real(gamma32 * dgamma)
    else:
        dgamma = jnp.sum(dy32 * xmu * inv_std, axis=grad_axes, keepdims=True)
        g = dy32 * gamma32
        sum_g = sum_over(g, config.stat_axes, config.axis_name)
        sum_g_xhat = sum_over(jnp.real(g * xmu), config.stat_axes, config.axis_name) * inv_std
    # dx = gamma * inv_std * dy - inv_std / m * (sum_g + conj(x_hat) * sum_g_xhat)
    dx = ((gamma32 * inv_std) * dy32 - (inv_std / count) * sum_g
          + (inv_std * inv_std / count * sum_g_xhat) * jnp.conj(mean - x.astype(dtype)))
    return (dx.astype(x.dtype), param_cotangent(dgamma, gamma.dtype),
            param_cotangent(dbeta, gamma.dtype))


def graph_rule(config: Config, residuals: Residuals,
               dy: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The staged backward: the forward graph walked node by node (cs231n's ``batchnorm_backward``).

    Forward graph, with sums over the statistics' axes and ``m`` values per statistic::

        mu = sum(x) / m;  xmu = x - mu;  var = sum(|xmu|^2) / m;  sqrtvar = sqrt(var + eps)
        ivar = 1 / sqrtvar;  x_hat = xmu * ivar;  y = gamma * x_hat + beta

    Backward, one node at a time in reverse (the two paths into ``xmu`` and into ``x`` add; the
    real ``ivar`` and ``var`` take real parts, and ``|xmu|^2`` pulls back ``2 conj(xmu)``, which
    for real data is the familiar ``2 xmu``)::

        dbeta = sum(dy);  dgamma = sum(dy * x_hat);  dx_hat = dy * gamma
        divar = sum(re(dx_hat * xmu));  dxmu1 = dx_hat * ivar
        dsqrtvar = -divar / sqrtvar^2;  dvar = 0.5 * dsqrtvar / sqrtvar
        dxmu2 = 2 * conj(xmu) * dvar / m;  dx1 = dxmu1 + dxmu2
        dmu = -sum(dx1);  dx = dx1 + dmu / m
    """
    x, mean, inv_std, gamma = residuals[:4]
    dtype = mean.dtype
    count = count_over(x.shape, config.stat_axes, config.axis_name)
    dy32 = dy.astype(dtype)
    xmu = x.astype(dtype) - mean
    ivar = inv_std
    sqrtvar = 1.0 / inv_std
    x_hat = xmu * ivar
    dbeta = jnp.sum(dy32, axis=config.grad_axes, keepdims=True)
    dgamma = jnp.sum(dy32 * x_hat, axis=config.grad_axes, keepdims=True)
    dx_hat = dy32 * gamma.astype(dtype)
    divar = sum_over(jnp.real(dx_hat * xmu), config.stat_axes, config.axis_name)
    dxmu1 = dx_hat * ivar
    dsqrtvar = -divar / jnp.square(sqrtvar)
    dvar = 0.5 * dsqrtvar / sqrtvar
    dxmu2 = 2.0 * jnp.conj(xmu) * dvar / count
    dx1 = dxmu1 + dxmu2
    dmu = -sum_over(dx1, config.stat_axes, config.axis_name)
    dx = dx1 + dmu / count
    return (dx.astype(x.dtype), param_cotangent(dgamma, gamma.dtype),
            param_cotangent(dbeta, gamma.dtype))
