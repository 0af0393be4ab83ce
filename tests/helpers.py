"""Helpers shared by the test modules: random inputs. Gradient comparisons live in
:mod:`jaxbn.testing`, which the tests use like any user would."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rand(seed: int, shape, dtype=jnp.float64, scale: float = 1.0, offset: float = 0.0):
    x = jax.random.normal(jax.random.key(seed), shape, jnp.float64) * scale + offset
    return x.astype(dtype)
