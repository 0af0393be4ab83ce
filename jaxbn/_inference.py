"""After training: precise running statistics, and batch norm folded into the layer before it.

Shapes: ``D_in``/``D`` input/output features of a dense layer; ``O, I, H, W`` a conv kernel's
output channels, input channels, height, width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks
from jaxbn._batch_norm import BatchNormState

KERNEL_LAYOUTS = ("dense", "OIHW", "HWIO")


def fold_batch_norm(w: jax.Array, b: jax.Array | None, gamma: jax.Array | None,
                    beta: jax.Array | None, state: BatchNormState, *, eps: float = 1e-5,
                    kernel_layout: str = "dense") -> tuple[jax.Array, jax.Array]:
    r"""Folds eval-mode batch norm into the dense or conv layer before it.

    With ``s = gamma / sqrt(var + eps)`` per output feature, batch norm of ``x @ w + b`` (or of a
    convolution) is ``x @ w' + b'`` with

    .. math::  w' = w \cdot s \text{ (along the output axis)}, \qquad b' = (b - \mu) s + \beta

    Args:
      w: ``(D_in, D)`` for ``kernel_layout="dense"``, ``(O, I, H, W)`` for ``"OIHW"``,
        ``(H, W, I, O)`` for ``"HWIO"``.
      b: the layer's bias ``(D,)`` or None.
      gamma, beta: batch norm's scale and shift ``(D,)``, or None (no affine part).
      state: the running statistics.
      eps: batch norm's eps.
      kernel_layout: where the output axis of ``w`` is.

    Returns:
      ``(w', b')`` in ``w``'s dtype (computed in float32 or wider).

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> key_w, key_x = jax.random.split(jax.random.key(0))
      >>> w, b = jax.random.normal(key_w, (5, 3)), jnp.array([0.5, 0.0, -0.5])
      >>> gamma, beta = jnp.array([1.0, 2.0, 0.5]), jnp.array([0.0, 1.0, -1.0])
      >>> state = jaxbn.BatchNormState(jnp.array([0.1, -0.2, 0.3]), jnp.array([1.5, 0.5, 2.0]))
      >>> x = jax.random.normal(key_x, (16, 5))
      >>> y, _ = jaxbn.batch_norm(x @ w + b, gamma, beta, state, train=False)
      >>> w_folded, b_folded = jaxbn.fold_batch_norm(w, b, gamma, beta, state)
      >>> bool(jnp.allclose(x @ w_folded + b_folded, y, atol=1e-5))
      True
    """
    _checks.check_choice("kernel_layout", kernel_layout, KERNEL_LAYOUTS)
    eps = _checks.check_real("eps", eps, low=0.0, low_open=True)
    w = _checks.check_float_array("w", w)
    out_axis = {"dense": w.ndim - 1, "OIHW": 0, "HWIO": w.ndim - 1}[kernel_layout]
    if kernel_layout != "dense" and w.ndim != 4:
        raise ValueError(f"w must be a 4-D {kernel_layout} kernel; got shape {tuple(w.shape)}.")
    d = w.shape[out_axis]
    dtype = _checks.stat_dtype(w.dtype, state.mean.dtype)
    vector = lambda name, a, fill: (jnp.full((d,), fill, dtype) if a is None
                                    else _checks.check_param(name, a, d, "output feature")
                                    .astype(dtype))
    gamma, beta, b = vector("gamma", gamma, 1.0), vector("beta", beta, 0.0), vector("b", b, 0.0)
    mean = _checks.check_param("state.mean", state.mean, d, "output feature").astype(dtype)
    var = _checks.check_param("state.var", state.var, d, "output feature").astype(dtype)
    scale = gamma * jax.lax.rsqrt(var + eps)
    shape = [1] * w.ndim
    shape[out_axis] = d
    w_folded = (w.astype(dtype) * scale.reshape(shape)).astype(w.dtype)
    return w_folded, ((b - mean) * scale + beta).astype(w.dtype)


def _is_state(node: Any) -> bool:
    return isinstance(node, BatchNormState)


def _fill(net_state: Any, value: float) -> Any:
    return jax.tree.map(lambda s: s._replace(mean=jnp.full_like(s.mean, value),
                                             var=jnp.full_like(s.var, value))
                        if _is_state(s) else s, net_state, is_leaf=_is_state)


def _moments(net_state: Any) -> Any:
    """The state's BatchNormState nodes with their mean/var only (the counters dropped)."""
    return [BatchNormState(s.mean, s.var) for s in jax.tree.leaves(net_state, is_leaf=_is_state)
            if _is_state(s)]


def recompute_batch_stats(apply_fn: Callable, params: Any, net_state: Any,
                          batches: Iterable[Any], *, key: jax.Array | None = None) -> Any:
    """Precise batch norm statistics: the running statistics recomputed as the population mean
    and (biased) variance of each layer's input over a stream of batches, parameters fixed.

    Use it after training and before evaluation: the running averages lag behind the weights
    (they mix statistics from many steps ago), which hurts small models and short runs. The
    batches should be of equal size (each batch counts once, as in fvcore's ``update_bn_stats``).

    Works for any ``apply_fn(params, state, x, *, train, key) -> (out, new_state)`` whose state is
    a pytree holding :class:`BatchNormState` nodes updated by jaxbn's batch norm (``jaxbn.nets``
    models, or your own). Each layer's batch statistics are read off two train-mode calls whose
    running statistics start at 0 and at 1: the update is ``a * old + b * batch`` for every
    momentum, so the pair gives ``batch`` exactly.

    Args:
      apply_fn: the model's apply function.
      params: the trained parameters.
      net_state: the state whose statistics are replaced (its structure is kept).
      batches: iterable of inputs ``x`` or of ``(x, y)`` pairs.
      key: PRNG key for dropout during the passes (folded with the batch index).

    Returns:
      ``net_state`` with every batch norm's ``mean``/``var`` replaced.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> from jaxbn import nets
      >>> params, state = nets.init_mlp(jax.random.key(0), 4, [8], 3, normalization="batchnorm")
      >>> batches = [jax.random.normal(jax.random.key(i), (16, 4)) + i for i in range(3)]
      >>> precise = jaxbn.recompute_batch_stats(nets.apply_mlp, params, state, batches)
      >>> h = jnp.concatenate(batches) @ params["W1"] + params["b1"]  # the first BN's input
      >>> bool(jnp.allclose(precise.batch_norm[0].mean, h.mean(0), atol=1e-5))
      True
      >>> bool(jnp.allclose(precise.batch_norm[0].var, h.var(0), rtol=1e-4))
      True
    """
    @jax.jit
    def batch_statistics(params, x, key):
        zero = apply_fn(params, _fill(net_state, 0.0), x, train=True, key=key)[1]
        one = apply_fn(params, _fill(net_state, 1.0), x, train=True, key=key)[1]
        # zero = w * batch, one = (1 - w) + w * batch  =>  w = 1 - (one - zero).
        return jax.tree.map(lambda z, o: z / (1.0 - (o - z)), _moments(zero), _moments(one))

    means, variances = [], []  # per batch: a list over the layers, float64 on the host
    for i, batch in enumerate(batches):
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        stats = batch_statistics(params, x, None if key is None else jax.random.fold_in(key, i))
        layers = [s for s in jax.tree.leaves(stats, is_leaf=_is_state) if _is_state(s)]
        means.append([np.asarray(s.mean, np.float64) for s in layers])
        variances.append([np.asarray(s.var, np.float64) for s in layers])
    if not means:
        raise ValueError("batches must hold at least one batch.")
    # Population variance = mean of the batch variances + variance of the batch means (the second
    # from centered batch means: no cancellation when |mean| >> spread).
    moments = []
    for layer in range(len(means[0])):
        m = np.stack([batch[layer] for batch in means])
        v = np.stack([batch[layer] for batch in variances])
        moments.append((m.mean(0), v.mean(0) + np.square(m - m.mean(0)).mean(0)))
    population = iter(moments)

    def replace(s):
        if not _is_state(s):
            return s
        mean, var = next(population)
        return s._replace(mean=jnp.asarray(mean, s.mean.dtype), var=jnp.asarray(var, s.var.dtype))

    return jax.tree.map(replace, net_state, is_leaf=_is_state)
