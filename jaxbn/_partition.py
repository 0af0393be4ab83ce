"""The native batch-norm kernels on a batch split across devices.

An XLA custom call has no partitioning rule of its own: left alone, XLA's partitioner gathers a
sharded operand onto every device and each computes the whole batch. :func:`forward` and
:func:`backward` give the kernels one, so that each device runs them on its own shard:

- under ``jax.jit`` with auto mesh axes, ``jax.experimental.custom_partitioning`` (the rule sees
  the shardings XLA chose, at compile time);
- under explicit mesh axes (the sharding is in the type, at trace time), ``jax.shard_map``.

Both run the same per-shard program. Where the batch (or spatial) axes of ``x`` are split, each
shard computes its statistics and the merge happens in JAX, by all-reduces of per-feature
vectors: Chan's parallel merge of ``(mean, var)`` (equal counts per shard)::

    mean = psum(mean_i) / P;   var = psum(var_i + (mean_i - mean)^2) / P

which, unlike the sums of ``x`` and ``x^2``, does not cancel when ``|mean| >> std``; in the
backward, ``psum`` of the two per-feature sums. ``x`` is never gathered; ``y`` and ``dx`` keep
``x``'s sharding; the statistics are those of the global batch. Along the feature axis and the
axes ``jax.vmap`` adds, shards are independent: no collective at all.

Shape legend (the op level): ``B...`` leading batch axes (``jax.vmap``'s), then ``x``'s own axes
with the features ``C`` at ``axis``; per-feature arrays are ``(B..., C)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec


class Plan(NamedTuple):
    """How one shard of ``x`` is computed: the specs XLA is asked for and the collectives."""

    x_spec: PartitionSpec  # x, y, dy, dx
    param_spec: PartitionSpec  # gamma, beta and the per-feature outputs, (B..., C)
    reduce_axes: tuple[str, ...]  # mesh axes splitting the reduced axes: psum over these
    shards: int  # the product of their sizes: shards per statistic


def plan(axis_sizes: dict[str, int], spec: Any, shape: tuple[int, ...], nb: int,
         axis: int) -> Plan:
    """The plan for ``x`` of global ``shape`` sharded by ``spec`` over a mesh of ``axis_sizes``.

    A dimension that the mesh axes do not divide evenly is kept whole (resharded, never
    padded: the kernels' counts must be exact).
    """
    entries = [_axes(e) for e in tuple(spec) + (None,) * (len(shape) - len(tuple(spec)))]
    entries = [e if shape[d] % math.prod(axis_sizes[a] for a in e) == 0 else ()
               for d, e in enumerate(entries)]
    channel = nb + axis
    reduce_axes = tuple(a for d, e in enumerate(entries) if d >= nb and d != channel for a in e)
    return Plan(PartitionSpec(*map(_entry, entries)),
                PartitionSpec(*map(_entry, entries[:nb]), _entry(entries[channel])),
                reduce_axes, math.prod(axis_sizes[a] for a in reduce_axes))


def _axes(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple[str, ...]) -> Any:
    return None if not axes else axes[0] if len(axes) == 1 else axes


# ---------------------------------------------------------------------------------------------
# The per-shard programs: kernel calls on the canonical view (B, R, C, S), collectives between.


def _stat_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _call(target, x, outs, *args, stats_shape, nb, axis, **attrs):
    """``target`` on ``x`` in its own shape (the kernel reads it as (B, R, C, S) from ``nb`` and
    ``axis``); ``outs``: "x" for an x-shaped result, "p" for a per-feature one."""
    stat = _stat_dtype(x)
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) if o == "x" else
                   jax.ShapeDtypeStruct(stats_shape, stat) for o in outs)
    return jax.ffi.ffi_call(target, shapes)(x, *args, batch_dims=np.int64(nb),
                                            axis=np.int64(nb + axis), **attrs)


def local_forward(x, gamma, beta, *residual, nb: int, axis: int, eps: float, relu: bool = False,
                  reduce_axes: tuple[str, ...] = (), shards: int = 1):
    """``(y, mean, var, inv_std, mean_low, inv_std_low)`` of one shard; with ``reduce_axes`` the
    statistics are merged across the shards along them (see the module docstring), and the two
    lows (what the float64 statistics add to the float32 ones) are zero. ``y`` has the epilogue:
    ``+ residual`` (where given, x-shaped), then a ReLU where ``relu``, inside the kernel's
    pass."""
    call = functools.partial(_call, stats_shape=gamma.shape, nb=nb, axis=axis)
    attrs = dict(eps=np.float64(eps), relu=np.bool_(relu))
    if not reduce_axes:
        return call("jaxbn_batch_norm_forward", x, "xppppp", gamma, beta, *residual, **attrs)
    mean_i, var_i = call("jaxbn_batch_norm_stats", x, "pp")
    mean = jax.lax.psum(mean_i, reduce_axes) / shards
    var = jax.lax.psum(var_i + jnp.square(mean_i - mean), reduce_axes) / shards
    y, inv_std = call("jaxbn_batch_norm_normalize", x, "xp", mean, var, gamma, beta, *residual,
                      **attrs)
    return y, mean, var, inv_std, jnp.zeros_like(mean), jnp.zeros_like(inv_std)


def local_backward(x, dy, mean, mean_low, inv_std, inv_std_low, gamma, *out, nb: int, axis: int,
                   dz: bool = False, reduce_axes: tuple[str, ...] = (), shards: int = 1):
    """``(dx, dgamma, dbeta)`` of one shard, the two per-feature sums summed across
    ``reduce_axes``. Unsplit, the kernel takes the statistics as ``mean + mean_low`` and
    ``inv_std + inv_std_low`` in float64 (the forward's, to 48 bits); split, the float32 ones
    alone (the lows are not read). After a split forward the lows are zero, and where XLA then
    runs the backward unsplit (x resharded between the two), it has the jnp rule's accuracy.

    ``out`` (where given): the forward's ReLU output; ``dy`` is masked by ``out > 0`` (in the
    kernel's passes unsplit, by XLA before the kernels split), and with ``dz`` the masked
    cotangent is returned fourth (the residual's)."""
    call = functools.partial(_call, stats_shape=gamma.shape, nb=nb, axis=axis)
    if not reduce_axes:
        return call("jaxbn_batch_norm_backward", x, "xpp" + "x" * dz, dy, mean, mean_low,
                    inv_std, inv_std_low, gamma, *out)
    if out:
        dy = jnp.where(out[0] > 0, dy, jnp.zeros((), dy.dtype))
    sums = jnp.stack(call("jaxbn_batch_norm_grad_sums", x, "pp", dy, mean))
    sum_dy, sum_dy_xmu = jax.lax.psum(sums, reduce_axes)
    count = math.prod(n for d, n in enumerate(x.shape) if d >= nb and d != nb + axis) * shards
    dx, = call("jaxbn_batch_norm_grad_input", x, "x", dy, mean, inv_std, gamma, sum_dy,
               sum_dy_xmu, count=np.float64(count))
    return (dx, sum_dy_xmu * inv_std, sum_dy) + ((dy,) if dz else ())


# ---------------------------------------------------------------------------------------------
# The ops: custom_partitioning for auto axes, shard_map for explicit ones, custom_vmap to hand
# jax.vmap's axis to the kernels as one more batch axis.


class _Op(NamedTuple):
    """One kernel program: ``local(*args, nb, axis, reduce_axes, shards, **attrs)``; its
    operands and results by kind ("x": x-shaped, "p": per-feature)."""

    local: Any
    ins: str
    outs: str


def forward(x, gamma, beta, residual=None, *, axis: int, eps: float, relu: bool = False):
    """``(y, mean, var, inv_std, mean_low, inv_std_low)``: batch norm of ``x`` over every axis
    but ``axis``, by the kernels, on each device's shard (:func:`local_forward`);
    ``gamma``/``beta`` ``(C,)`` in the statistics' dtype; ``y = relu(... + residual)`` with the
    epilogue's ``residual`` (x-shaped) and ``relu``."""
    extra = () if residual is None else (residual,)
    op = _Op(local_forward, "xpp" + "x" * len(extra), "xppppp")
    attrs = (("eps", float(eps)), ("relu", bool(relu)))
    return _op(op, 0, axis, x.ndim, attrs)(x, gamma, beta, *extra)


def backward(x, dy, mean, mean_low, inv_std, inv_std_low, gamma, out=None, *, axis: int,
             dz: bool = False):
    """``(dx, dgamma, dbeta)`` of :func:`forward`'s ``y`` for the cotangent ``dy``, from its
    statistics; with ``out`` (the forward's ReLU output) for ``dz = dy * [out > 0]``, returned
    fourth where ``dz``."""
    extra = () if out is None else (out,)
    op = _Op(local_backward, "xxppppp" + "x" * len(extra), "xpp" + "x" * dz)
    attrs = (("dz", bool(dz)),)
    return _op(op, 0, axis, x.ndim, attrs)(x, dy, mean, mean_low, inv_std, inv_std_low, gamma,
                                           *extra)


def supported(x_type) -> bool:
    """Whether the kernels can take the sharding of an ``x`` of type ``x_type``: not on a mesh
    that mixes explicit axes with auto ones (the type shows only the explicit part of the
    sharding, so the split could not be planned)."""
    mesh = _typed_mesh(x_type)
    if mesh is None:
        return True
    kinds = {t for t, n in zip(mesh.axis_types, mesh.axis_sizes) if n > 1}
    return not (_EXPLICIT in kinds and _AUTO in kinds)


_EXPLICIT = getattr(jax.sharding.AxisType, "Explicit", None)
_AUTO = getattr(jax.sharding.AxisType, "Auto", None)


def _typed_mesh(x_type):
    """The mesh of ``x_type`` when it has explicit axes: the sharding is then in the type."""
    mesh = getattr(getattr(x_type, "sharding", None), "mesh", None)
    if mesh is None or _EXPLICIT not in tuple(getattr(mesh, "axis_types", ())):
        return None
    return mesh


@functools.cache
def _op(op: _Op, nb: int, axis: int, ndim: int, attrs: tuple):
    """``op`` for an ``x`` of rank ``ndim`` with ``nb`` leading batch axes."""
    partitioned = _partitioned(op, nb, axis, ndim, attrs)

    @jax.custom_batching.custom_vmap
    def call(*args):
        mesh = _typed_mesh(jax.typeof(args[0]))
        if mesh is None:
            return tuple(partitioned(*args))
        return _shard_mapped(op, nb, axis, attrs, mesh, args)

    @call.def_vmap
    def _vmap_rule(axis_size, in_batched, *args):
        args = [a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
                for a, batched in zip(args, in_batched)]
        return _op(op, nb + 1, axis, ndim + 1, attrs)(*args), (True,) * len(op.outs)

    return call


def _local(op: _Op, nb: int, axis: int, attrs: tuple, p: Plan | None = None):
    kwargs = dict(attrs, nb=nb, axis=axis)
    if p is not None:
        kwargs.update(reduce_axes=p.reduce_axes, shards=p.shards)

    def local(*args):  # positional only: custom_partitioning binds the arguments by position
        return op.local(*args, **kwargs)
    return local


def _specs(p: Plan, kinds: str) -> tuple[PartitionSpec, ...]:
    return tuple(p.x_spec if k == "x" else p.param_spec for k in kinds)


def _partitioned(op: _Op, nb: int, axis: int, ndim: int, attrs: tuple):
    """The op under ``custom_partitioning``: on one device it is the fused program; on a mesh,
    each device runs it on its shard (the plan comes from the sharding XLA gives ``x``)."""
    fn = custom_partitioning(_local(op, nb, axis, attrs))

    def plan_for(mesh, arg_shapes):
        x = arg_shapes[0]
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        return plan(dict(mesh.shape), spec, x.shape, nb, axis)

    def shardings(mesh, p, kinds):
        return tuple(NamedSharding(mesh, s) for s in _specs(p, kinds))

    def partition(mesh, arg_shapes, result_shape):
        p = plan_for(mesh, arg_shapes)
        return (mesh, _local(op, nb, axis, attrs, p), shardings(mesh, p, op.outs),
                shardings(mesh, p, op.ins))

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, plan_for(mesh, arg_shapes), op.outs)

    # Shardy's rule: x-shaped values share every factor; per-feature ones the batch factors and
    # the feature factor c.
    batch = [f"b{i}" for i in range(nb)]
    x = " ".join(batch + ["c" if d == axis else f"d{d}" for d in range(ndim - nb)])
    per_feature = " ".join(batch + ["c"])
    kind = lambda k: x if k == "x" else per_feature
    fn.def_partition(partition=partition, infer_sharding_from_operands=infer,
                     sharding_rule=", ".join(map(kind, op.ins)) + " -> "
                     + ", ".join(map(kind, op.outs)))
    return fn


def _shard_mapped(op: _Op, nb: int, axis: int, attrs: tuple, mesh, args):
    """The op under ``shard_map`` over an explicit mesh: the plan comes from ``x``'s type."""
    x = args[0]
    p = plan(dict(mesh.shape), jax.typeof(x).sharding.spec, x.shape, nb, axis)
    in_specs = _specs(p, op.ins)
    # Parameters (per feature, small) follow x's feature sharding: a slice, never a gather of x.
    args = [a if _same_spec(jax.typeof(a).sharding.spec, s, a.ndim) else
            jax.sharding.reshard(a, s) for a, s in zip(args, in_specs)]
    return jax.shard_map(_local(op, nb, axis, attrs, p), mesh=mesh, in_specs=in_specs,
                         out_specs=_specs(p, op.outs), check_vma=False)(*args)


def _same_spec(a: Any, b: Any, ndim: int) -> bool:
    pad = lambda s: tuple(map(_axes, tuple(s) + (None,) * (ndim - len(tuple(s)))))
    return pad(a) == pad(b)
