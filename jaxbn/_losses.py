"""Losses for classification: softmax cross-entropy and the L2 weight penalty.

Shapes: ``N`` batch, ``K`` classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks


def softmax_cross_entropy(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``(N, K)`` scores against integer labels ``(N,)``."""
    log_probs = jax.nn.log_softmax(scores.astype(_checks.stat_dtype(scores.dtype)), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def l2_penalty(params: Any, reg: float) -> jax.Array:
    """``0.5 * reg * sum(W ** 2)`` over the weights: the parameters of rank >= 2 (matrices and
    conv kernels), never biases, gammas or betas."""
    weights = [w for w in jax.tree.leaves(params) if w.ndim >= 2]
    return 0.5 * reg * sum(jnp.sum(jnp.square(w.astype(_checks.stat_dtype(w.dtype))))
                           for w in weights)
