"""Helpers shared by the test modules: random inputs. Gradient comparisons live in
:mod:`jaxbn.testing`, which the tests use like any user would."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rand(seed: int, shape, dtype=jnp.float64, scale: float = 1.0, offset: float = 0.0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64) * scale + offset
    return x.astype(dtype)


def x64_off():
    """A context in which JAX's float64 is off (the tests enable it globally)."""
    if hasattr(jax, "enable_x64"):  # JAX >= 0.8
        return jax.enable_x64(False)
    from jax.experimental import disable_x64  # the floor, 0.7
    return disable_x64()
