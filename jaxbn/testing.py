"""Gradient-equivalence testing for hand-written VJPs: ``import jaxbn.testing``.

Three checks, each raising an ``AssertionError`` whose message names the input, the pytree leaf,
the worst element's index, the two values and the tolerance used:

- :func:`check_vjp`: outputs and VJPs of ``f`` against ``f_ref`` (e.g. ``jax.vjp`` of a naive
  forward) under several random cotangents, for every differentiable input.
- :func:`check_finite_differences`: the VJP of ``f`` (first order) or its reverse-over-reverse
  derivative (second order) against centered differences in float64.
- :func:`check_transforms`: the same results eagerly, under ``jax.jit``, under ``jax.vmap`` over a
  stacked batch of inputs (against a Python loop), and to second order.

Cotangents are independent standard-normal draws per element, never constant along any axis. This
is the point: for a normalization, a cotangent that is constant over the statistics' axes (the
``grad(sum(y))`` test) makes the input gradient vanish identically, so *any* backward passes it.

Tolerances, unless given: for a result of dtype ``t`` computed with accumulation in ``a =
promote(t, float32)`` over reductions of ``m`` values (``reduction_size``, by default the size of
the largest input leaf)::

    rtol = 4 * eps(a) * sqrt(m) + 8 * eps(a) + 2 * eps(t)

relative to the largest magnitude of the reference leaf: about ``4.8e-7 * sqrt(m) + 1e-6`` in
float32, ``1.6e-2`` in bfloat16 (one rounding each way), ``1e-15``-scale in float64.

Shapes: any; every function takes pytrees of arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["check_vjp", "check_finite_differences", "check_transforms", "default_rtol"]


def default_rtol(dtype: Any, reduction_size: int = 1) -> float:
    """The default relative tolerance for results of ``dtype`` (see the module docstring).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import testing
      >>> f"{testing.default_rtol(jnp.float32, reduction_size=100):.2e}"  # 4 eps * 10 + 10 eps
      '5.96e-06'
    """
    dtype = jnp.dtype(dtype)
    acc = jnp.promote_types(dtype, jnp.float32)
    eps_acc, eps = float(jnp.finfo(acc).eps), float(jnp.finfo(dtype).eps)
    return 4 * eps_acc * math.sqrt(max(reduction_size, 1)) + 8 * eps_acc + 2 * eps


# ---------------------------------------------------------------------------------------------
# Inputs: which leaves are differentiated, and how they are named in messages.


def _is_inexact(leaf: Any) -> bool:
    return hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact) or \
        isinstance(leaf, float)


class _Inputs:
    """The primals split into differentiable leaves (inexact leaves of ``argnums``) and the rest,
    with a name for each differentiable leaf (``input 1['gamma']``)."""

    def __init__(self, primals: Sequence[Any], argnums: Sequence[int] | None):
        self.primals = tuple(primals)
        self.argnums = tuple(range(len(primals))) if argnums is None else tuple(argnums)
        for i in self.argnums:
            if not 0 <= i < len(primals):
                raise ValueError(f"argnums must index the {len(primals)} primals; got {i}.")
        self.flat, self.treedef = jax.tree_util.tree_flatten_with_path(self.primals)
        self.positions = [k for k, (path, leaf) in enumerate(self.flat)
                          if path[0].idx in self.argnums and _is_inexact(leaf)]
        if not self.positions:
            raise ValueError("no differentiable input: the primals selected by argnums hold no "
                             "floating-point array.")
        self.names = [f"input {self.flat[k][0][0].idx}"
                      f"{jax.tree_util.keystr(self.flat[k][0][1:])}" for k in self.positions]

    @property
    def leaves(self) -> list:
        return [jnp.asarray(self.flat[k][1]) for k in self.positions]

    def call(self, f: Callable, leaves: Sequence[Any]) -> Any:
        """``f(*primals)`` with the differentiable leaves replaced by ``leaves``."""
        all_leaves = [leaf for _, leaf in self.flat]
        for k, leaf in zip(self.positions, leaves):
            all_leaves[k] = leaf
        return f(*jax.tree.unflatten(self.treedef, all_leaves))


def _cast_floats(tree: Any, dtype: Any) -> Any:
    if dtype is None:
        return tree
    return jax.tree.map(lambda a: jnp.asarray(a, dtype) if _is_inexact(a) else a, tree)


def _main_output(f: Callable, has_aux: bool) -> Callable:
    return (lambda *args: f(*args)[0]) if has_aux else f


def _random_cotangent(key: jax.Array, out: Any) -> Any:
    """A standard-normal draw per element of every inexact output leaf (zeros of float0 for the
    others): never constant along any axis."""
    leaves, treedef = jax.tree.flatten(out)
    keys = jax.random.split(key, max(len(leaves), 1))
    cts: list[Any] = []
    for k, leaf in zip(keys, leaves):
        if _is_inexact(leaf):
            draw = jax.random.normal(k, jnp.shape(leaf), jnp.promote_types(leaf.dtype,
                                                                           jnp.float32))
            cts.append(draw.astype(leaf.dtype))
        else:
            cts.append(np.zeros(jnp.shape(leaf), jax.dtypes.float0))
    return jax.tree.unflatten(treedef, cts)


# ---------------------------------------------------------------------------------------------
# Comparison with a message that says where and by how much.


def _compare(what: str, actual: Any, expected: Any, *, rtol: float | None, atol: float,
             reduction_size: int) -> None:
    a_leaves, a_def = jax.tree_util.tree_flatten_with_path(actual)
    e_leaves, e_def = jax.tree_util.tree_flatten_with_path(expected)
    if str(a_def) != str(e_def):
        raise AssertionError(f"{what}: the tree structures differ:\n  got      {a_def}\n  "
                             f"expected {e_def}")
    for (path, a), (_, e) in zip(a_leaves, e_leaves):
        _compare_leaf(f"{what}{jax.tree_util.keystr(path)}", a, e, rtol=rtol, atol=atol,
                      reduction_size=reduction_size)


def _compare_leaf(what, a, e, *, rtol, atol, reduction_size) -> None:
    if not (_is_inexact(a) or _is_inexact(e)):
        return
    a64, e64 = np.asarray(a, np.float64), np.asarray(e, np.float64)
    if a64.shape != e64.shape:
        raise AssertionError(f"{what}: shape {a64.shape}, expected {e64.shape}.")
    if a64.size == 0:
        return
    tol = default_rtol(jnp.result_type(a), reduction_size) if rtol is None else rtol
    scale = float(np.max(np.abs(e64[np.isfinite(e64)]), initial=0.0)) or 1.0
    diff = np.array(np.abs(a64 - e64), np.float64)
    diff[np.isnan(a64) & np.isnan(e64)] = 0.0  # NaN where the reference has NaN too
    diff[np.isnan(diff)] = np.inf
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    if not diff[worst] <= tol * scale + atol:
        raise AssertionError(
            f"{what} differs from the reference: worst element at index "
            f"{tuple(map(int, worst))}: {float(a64[worst]):.10g} vs {float(e64[worst]):.10g} "
            f"(|difference| {diff[worst]:.3e} > tolerance {tol:.3e} x max|reference| "
            f"{scale:.3e} + atol {atol:.1e}).")


# ---------------------------------------------------------------------------------------------
# check_vjp


def check_vjp(f: Callable, f_ref: Callable, *primals: Any, argnums: Sequence[int] | None = None,
              key: jax.Array | None = None, draws: int = 3, has_aux: bool = False,
              compare_aux: bool = False, rtol: float | None = None, atol: float = 0.0,
              reduction_size: int | None = None, reference_dtype: Any = None,
              jit: bool = True) -> None:
    """Checks outputs and VJPs of ``f`` against ``f_ref`` under random cotangents.

    Args:
      f: the function under test (e.g. with a hand-written ``custom_vjp``).
      f_ref: the reference, differentiated by JAX (e.g. the naive forward).
      *primals: the arguments, pytrees of arrays.
      argnums: which arguments to differentiate (default: all); their floating leaves are the
        differentiable inputs, the other leaves are held fixed.
      key: PRNG key for the cotangents (default ``jax.random.key(0)``).
      draws: how many independent cotangents.
      has_aux: ``f`` and ``f_ref`` return ``(out, aux)``; ``aux`` gets no cotangent and is
        ignored unless ``compare_aux``.
      rtol, atol: tolerances; ``rtol`` defaults to :func:`default_rtol` of each result's dtype.
      reduction_size: ``m`` in the default tolerance (default: the largest input leaf's size).
      reference_dtype: run ``f_ref`` with floating inputs cast to this dtype (e.g.
        ``jnp.float64``, to compare a float32 rule against float64 ground truth).
      jit: compute each side's output and VJPs in one ``jax.jit`` (one compilation instead of
        one per operation: much faster for small inputs); a side that cannot be traced (a
        reference that reads array values, e.g. ``np.flatnonzero(mask)``) runs eagerly.
        ``False`` runs both eagerly.

    Raises:
      AssertionError: naming the output or input, the leaf, the worst element's index, the two
        values and the tolerance.

    Example: a hand-written rule against ``jax.vjp`` of the naive forward.

      >>> import jax, jax.numpy as jnp
      >>> from jaxbn import testing
      >>> naive = lambda x: x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True))
      >>> @jax.custom_vjp
      ... def rms(x):
      ...     return naive(x)
      >>> rms.defvjp(lambda x: (naive(x), x),
      ...            lambda x, dy: (jax.vjp(naive, x)[1](dy)[0],))
      >>> x = jax.random.normal(jax.random.key(0), (4, 3))
      >>> testing.check_vjp(rms, naive, x)  # passes: returns None
      >>> wrong = lambda x: x / jax.lax.stop_gradient(jnp.sqrt(jnp.mean(x * x, -1, keepdims=True)))
      >>> testing.check_vjp(wrong, naive, x)
      Traceback (most recent call last):
      AssertionError: VJP (random cotangent 0) w.r.t. input 0 differs from the reference: ...
    """
    inputs = _Inputs(primals, argnums)
    ref_inputs = _Inputs(_cast_floats(primals, reference_dtype), argnums)
    m = reduction_size or max(int(np.size(leaf)) for leaf in inputs.leaves)
    tolerances: dict[str, Any] = dict(rtol=rtol, atol=atol, reduction_size=m)
    keys = jax.random.split(jax.random.key(0) if key is None else key, draws)
    out_shape = jax.eval_shape(lambda *xs: inputs.call(_main_output(f, has_aux), xs),
                               *inputs.leaves)
    # The same cotangents for both sides (cast to the reference's dtypes there), drawn outside
    # the compiled functions: a jitted random draw compiles slowly.
    cts = [_random_cotangent(k, out_shape) for k in keys]
    ours = _vjps(f, inputs, has_aux, jit)(inputs.leaves, _inexact(cts))
    theirs = _vjps(f_ref, ref_inputs, has_aux, jit)(ref_inputs.leaves, _inexact(cts))
    _compare("output", ours[0], theirs[0], **tolerances)
    if has_aux and compare_aux:
        _compare("aux output", ours[1], theirs[1], **tolerances)
    for draw, (grads, grads_ref) in enumerate(zip(ours[2], theirs[2])):
        for name, g, g_ref in zip(inputs.names, grads, grads_ref):
            _compare(f"VJP (random cotangent {draw}) w.r.t. {name}", g, g_ref, **tolerances)


def _inexact(tree: Any) -> Any:
    """The inexact leaves of ``tree``, None for the others (float0 cannot enter ``jax.jit``)."""
    return jax.tree.map(lambda a: a if _is_inexact(a) else None, tree)


def _vjps(f: Callable, inputs: _Inputs, has_aux: bool, jit: bool) -> Callable:
    """``(leaves, cotangents) -> (out, aux, [VJP for each cotangent])`` for one side."""
    def run(leaves, cts):
        call = lambda *xs: inputs.call(f, xs)
        if has_aux:
            out, pullback, aux = jax.vjp(call, *leaves, has_aux=True)
        else:
            (out, pullback), aux = jax.vjp(call, *leaves), None
        grads = []
        for ct in cts:
            ct = jax.tree.map(lambda c, o: c.astype(o.dtype) if c is not None else
                              np.zeros(jnp.shape(o), jax.dtypes.float0), ct, out,
                              is_leaf=lambda c: c is None)
            grads.append(pullback(ct))
        return out, aux, grads

    if not jit:
        return run
    compiled = jax.jit(run)

    def run_compiled_if_traceable(leaves, cts):
        try:
            return compiled(leaves, cts)
        except _VALUE_DEPENDENT:
            return run(leaves, cts)

    return run_compiled_if_traceable


# The errors of a function that needs concrete values, which jax.jit cannot give it.
_VALUE_DEPENDENT = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                    jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


# ---------------------------------------------------------------------------------------------
# check_finite_differences


def _cs231n_check(what: str, analytic: np.ndarray, numeric: np.ndarray, tol: float,
                  atol: float) -> None:
    """cs231n's relative error ``|a - n| / max(1e-8, |a| + |n|)``, elementwise; entries whose
    absolute difference is within ``atol`` (round-off of the differences) pass."""
    diff = np.array(np.abs(analytic - numeric), np.float64)
    rel = np.array(diff / np.maximum(1e-8, np.abs(analytic) + np.abs(numeric)), np.float64)
    rel[diff <= atol] = 0.0
    rel[np.isnan(rel)] = np.inf
    if rel.size and not np.max(rel) <= tol:
        worst = np.unravel_index(int(np.argmax(rel)), rel.shape)
        raise AssertionError(
            f"{what} differs from centered finite differences: worst element at index "
            f"{tuple(map(int, worst))}: {float(analytic[worst]):.10g} (autodiff) vs "
            f"{float(numeric[worst]):.10g} (finite differences), relative error "
            f"{rel[worst]:.3e} > tolerance {tol:.1e}.")


def _numerical_gradient(scalar: Callable, leaves: list, index: int, h: float) -> np.ndarray:
    """Centered differences of ``scalar(*leaves)`` w.r.t. ``leaves[index]``, entry by entry."""
    base = np.array(leaves[index], np.float64)
    grad = np.zeros_like(base)
    for i in np.ndindex(base.shape):
        values = []
        for step in (h, -h):
            bumped = base.copy()
            bumped[i] += step
            args = list(leaves)
            args[index] = jnp.asarray(bumped)
            values.append(float(scalar(*args)))
        grad[i] = (values[0] - values[1]) / (2 * h)
    return grad


def check_finite_differences(f: Callable, *primals: Any, order: int = 1,
                             argnums: Sequence[int] | None = None, key: jax.Array | None = None,
                             h: float = 1e-5, tol: float | None = None,
                             has_aux: bool = False) -> None:
    """Checks ``f``'s derivatives against centered finite differences, in float64.

    ``order=1`` compares the VJP of ``f`` under a random cotangent ``u`` with the differences of
    ``s(x) = <f(x), u>``. ``order=2`` compares the reverse-over-reverse derivative of ``q(x) =
    <grad s(x), v>`` (``v`` random) with the differences of ``q``: it exercises the backward's
    own derivative. Errors are cs231n's relative errors, elementwise.

    Args:
      f: the function under test; floating inputs are cast to float64.
      *primals: the arguments (pytrees); keep them small, each entry costs two evaluations.
      order: 1 or 2.
      argnums: which arguments to perturb (default: all, their floating leaves).
      key: PRNG key for ``u`` and ``v``.
      h: the step.
      tol: the largest relative error allowed (default 1e-7 for order 1, 1e-6 for order 2).
      has_aux: ``f`` returns ``(out, aux)``; ``aux`` is ignored.

    Raises:
      RuntimeError: float64 is off (``jax.config.update("jax_enable_x64", True)`` first).
      AssertionError: naming the input, the worst element's index and the two values.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> jax.config.update("jax_enable_x64", True)  # at startup, before any array
      >>> from jaxbn import testing
      >>> state = jaxbn.init_batch_norm_state(3, jnp.float64)
      >>> f = lambda x, g: jaxbn.batch_norm(x, g, jnp.zeros(3), state, train=True)[0]
      >>> x = jax.random.normal(jax.random.key(0), (6, 3), jnp.float64)
      >>> testing.check_finite_differences(f, x, jnp.ones(3), order=2)  # passes: None
    """
    if not jax.config.read("jax_enable_x64"):
        raise RuntimeError(
            "check_finite_differences needs float64: run jax.config.update('jax_enable_x64', "
            "True) at startup, before creating any array (float32 differences are too noisy to "
            "tell a right gradient from a wrong one).")
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2; got {order!r}.")
    inputs = _Inputs(_cast_floats(primals, jnp.float64), argnums)
    fn = _main_output(f, has_aux)
    key_u, key_v = jax.random.split(jax.random.key(1) if key is None else key)
    u = _random_cotangent(key_u, jax.eval_shape(lambda *xs: inputs.call(fn, xs), *inputs.leaves))

    def s(*leaves):
        out = inputs.call(fn, leaves)
        return sum(jnp.vdot(o, c) for o, c in zip(jax.tree.leaves(out), jax.tree.leaves(u))
                   if _is_inexact(o))

    scalar = s
    if order == 2:
        v = _random_cotangent(key_v, inputs.leaves)
        grad_s = jax.grad(s, argnums=tuple(range(len(inputs.leaves))))
        scalar = lambda *leaves: sum(jnp.vdot(g, w) for g, w in zip(grad_s(*leaves), v))
    analytic = jax.grad(scalar, argnums=tuple(range(len(inputs.leaves))))(*inputs.leaves)
    jitted = jax.jit(scalar)
    tol = (1e-7 if order == 1 else 1e-6) if tol is None else tol
    for i, (name, a) in enumerate(zip(inputs.names, analytic)):
        numeric = _numerical_gradient(jitted, inputs.leaves, i, h)
        a = np.asarray(a, np.float64)
        atol = 1e-7 * float(np.max(np.abs(numeric), initial=0.0))
        label = "gradient" if order == 1 else "second-order (reverse-over-reverse) derivative"
        _cs231n_check(f"{label} w.r.t. {name}", a, numeric, tol, atol)


# ---------------------------------------------------------------------------------------------
# check_transforms


def _results(f: Callable, inputs: _Inputs, leaves: Sequence[Any], ct: Any) -> tuple:
    out, pullback = jax.vjp(lambda *xs: inputs.call(f, xs), *leaves)
    return out, pullback(ct)


def _second_order(f: Callable, inputs: _Inputs, leaves: Sequence[Any], ct: Any, v: Any):
    """``grad <vjp(f)(ct), v>``: reverse-over-reverse, through the backward's own derivative."""
    def q(*xs):
        grads = _results(f, inputs, xs, ct)[1]
        return sum(jnp.vdot(g, w) for g, w in zip(grads, v))
    return jax.grad(q, argnums=tuple(range(len(leaves))))(*leaves)


def _perturbed_batch(key: jax.Array, primals: tuple, batch_size: int) -> tuple:
    """``batch_size`` copies of the primals stacked on a new leading axis, the floating leaves
    perturbed by 10% of their spread so that every copy differs."""
    leaves, treedef = jax.tree.flatten(primals)
    keys = jax.random.split(key, max(len(leaves), 1))
    stacked = []
    for k, leaf in zip(keys, leaves):
        leaf = jnp.asarray(leaf)
        copies = jnp.broadcast_to(leaf, (batch_size,) + leaf.shape)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            spread = jnp.std(leaf.astype(jnp.float32)) + 1.0 if leaf.size > 1 else 1.0
            noise = jax.random.normal(k, copies.shape, jnp.float32) * 0.1 * spread
            copies = (copies + noise).astype(leaf.dtype)
        stacked.append(copies)
    return tuple(jax.tree.unflatten(treedef, stacked))


def check_transforms(f: Callable, *primals: Any, argnums: Sequence[int] | None = None,
                     key: jax.Array | None = None, batch_size: int = 3,
                     second_order: bool = True, has_aux: bool = False,
                     rtol: float | None = None, atol: float = 0.0,
                     reduction_size: int | None = None) -> None:
    """Checks that ``f`` gives the same outputs and VJPs eagerly, under ``jax.jit`` and under
    ``jax.vmap`` over a stacked batch of inputs (against a Python loop over the batch), and the
    same reverse-over-reverse second derivative eagerly and under ``jit``.

    The batch for ``vmap`` is ``batch_size`` perturbed copies of the primals (every floating leaf
    moved by 10% of its spread), so a rule that pools across the batch, or ignores the mapped axis,
    gives different results from the loop.

    Args:
      f: the function under test.
      *primals: the arguments (pytrees).
      argnums: which arguments to differentiate (default: all).
      key: PRNG key for the cotangents and the perturbations.
      batch_size: the size of the vmapped batch.
      second_order: also check reverse-over-reverse (set False for functions without it).
      has_aux, rtol, atol, reduction_size: as in :func:`check_vjp`.

    Raises:
      AssertionError: naming the transform, the output or input, the leaf, the worst element's
        index, the two values and the tolerance.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> from jaxbn import testing
      >>> g, b = jnp.ones(3), jnp.zeros(3)
      >>> f = lambda x: jaxbn.layer_norm(x, g, b)
      >>> testing.check_transforms(f, jax.random.normal(jax.random.key(0), (4, 3)))  # None
    """
    inputs = _Inputs(primals, argnums)
    fn = _main_output(f, has_aux)
    m = reduction_size or max(int(np.size(leaf)) for leaf in inputs.leaves)
    tolerances: dict[str, Any] = dict(rtol=rtol, atol=atol, reduction_size=m)
    k_ct, k_v, k_batch = jax.random.split(jax.random.key(2) if key is None else key, 3)
    ct = _random_cotangent(k_ct, jax.eval_shape(lambda *xs: inputs.call(fn, xs), *inputs.leaves))
    eager = _results(fn, inputs, inputs.leaves, ct)
    jitted = jax.jit(lambda xs, c: _results(fn, inputs, xs, c))(inputs.leaves, ct)
    _compare("under jax.jit: output", jitted[0], eager[0], **tolerances)
    _compare_grads("under jax.jit", inputs.names, jitted[1], eager[1], tolerances)
    _check_vmap(fn, inputs, k_batch, batch_size, ct, tolerances)
    if second_order:
        v = _random_cotangent(k_v, inputs.leaves)
        eager2 = _second_order(fn, inputs, inputs.leaves, ct, v)
        jit2 = jax.jit(lambda xs: _second_order(fn, inputs, xs, ct, v))(inputs.leaves)
        _compare_grads("second order (reverse-over-reverse) under jax.jit", inputs.names, jit2,
                       eager2, tolerances)


def _compare_grads(what: str, names: list, grads: Sequence, expected: Sequence,
                   tolerances: dict) -> None:
    for name, g, e in zip(names, grads, expected):
        _compare(f"{what}: VJP w.r.t. {name}", g, e, **tolerances)


def _check_vmap(fn, inputs: _Inputs, key, batch_size, ct, tolerances) -> None:
    batch = _perturbed_batch(key, inputs.primals, batch_size)
    cts = jax.tree.map(lambda c: jnp.stack([c] * batch_size) if c.dtype != jax.dtypes.float0
                       else np.zeros((batch_size,) + c.shape, c.dtype), ct)

    def one(primals, c):
        sub = _Inputs(primals, inputs.argnums)
        return _results(fn, sub, sub.leaves, c)

    mapped = jax.vmap(one)(batch, cts)
    for i in range(batch_size):
        pick = lambda tree, i=i: jax.tree.map(lambda a: a[i], tree)
        looped = one(pick(batch), pick(cts))
        _compare(f"under jax.vmap (batch element {i}): output", pick(mapped[0]), looped[0],
                 **tolerances)
        _compare_grads(f"under jax.vmap (batch element {i})", inputs.names, pick(mapped[1]),
                       looped[1], tolerances)
