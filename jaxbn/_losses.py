"""Losses for classification: softmax cross-entropy and the L2 weight penalty.

Shapes: ``N`` batch, ``K`` classes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _checks


def softmax_cross_entropy(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``(N, K)`` scores against integer labels ``(N,)``.

    Computed in float32 (or wider) from ``log_softmax``, so large scores do not overflow.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import nets
      >>> loss = nets.softmax_cross_entropy(jnp.zeros((4, 10)), jnp.array([0, 1, 2, 3]))
      >>> bool(jnp.isclose(loss, jnp.log(10.0)))  # uniform scores: log K
      True
    """
    log_probs = jax.nn.log_softmax(scores.astype(_checks.stat_dtype(scores.dtype)), axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1))


def l2_penalty(params: Any, reg: float) -> jax.Array:
    """``0.5 * reg * sum(W ** 2)`` over the weights: the parameters of rank >= 2 (matrices and
    conv kernels), never biases, gammas or betas.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxbn import nets
      >>> params = {"W1": jnp.ones((2, 3)), "b1": jnp.ones(3), "gamma1": jnp.ones(3)}
      >>> round(float(nets.l2_penalty(params, reg=0.1)), 6)  # 0.5 * 0.1 * 6
      0.3
    """
    weights = [w for w in jax.tree.leaves(params) if w.ndim >= 2]
    total = sum(jnp.sum(jnp.square(w.astype(_checks.stat_dtype(w.dtype)))) for w in weights)
    return jnp.asarray(0.5 * reg * total)
