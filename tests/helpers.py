"""Helpers shared by the test modules: random inputs, VJP comparison, finite differences."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rand(seed: int, shape, dtype=jnp.float64, scale: float = 1.0, offset: float = 0.0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64) * scale + offset
    return x.astype(dtype)


def max_rel_error(actual, expected) -> float:
    """Largest error relative to the largest reference magnitude (robust to entries near 0)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def cs231n_rel_error(x, y) -> float:
    """cs231n's elementwise relative error ``max |x - y| / max(1e-8, |x| + |y|)``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    return float(np.max(np.abs(x - y) / np.maximum(1e-8, np.abs(x) + np.abs(y))))


def vjps(fn, args, seed: int = 123, structured: bool = False):
    """``jax.vjp`` of ``fn`` at ``args`` under a random normal cotangent; returns (out, grads).

    With ``structured``, ``fn`` returns ``(y, aux)``: ``y`` gets the random cotangent, ``aux`` (a
    pytree, e.g. the running statistics) zeros. Forward and backward run as one jitted computation.
    """
    out_type = jax.eval_shape(fn, *args)
    y_type = out_type[0] if structured else out_type
    cot = jax.random.normal(jax.random.key(seed), y_type.shape, jnp.float64).astype(y_type.dtype)
    if structured:
        cot = (cot, jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), out_type[1]))

    @jax.jit
    def run(args, cot):
        out, pullback = jax.vjp(fn, *args)
        return out, pullback(cot)

    return run(tuple(args), cot)


def numerical_vjp(fn, args, cotangent, index: int, h: float = 1e-5) -> np.ndarray:
    """Centered finite differences of ``sum(fn(*args) * cotangent)`` w.r.t. ``args[index]``.

    The idea of cs231n's ``eval_numerical_gradient_array``: perturb one entry at a time.
    """
    args = [np.array(a, np.float64) for a in args]
    cot = np.asarray(cotangent, np.float64)
    target = args[index]
    grad = np.zeros_like(target)
    for i in np.ndindex(target.shape):
        old = target[i]
        target[i] = old + h
        plus = np.sum(np.asarray(fn(*args)) * cot)
        target[i] = old - h
        minus = np.sum(np.asarray(fn(*args)) * cot)
        target[i] = old
        grad[i] = (plus - minus) / (2 * h)
    return grad
