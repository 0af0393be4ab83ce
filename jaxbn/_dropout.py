"""Inverted dropout with explicit PRNG keys."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbn import _checks


def _check_key(key: Any) -> None:
    if key is None:
        raise TypeError("key must be a PRNG key in train mode (jax.random.key(seed) or "
                        "jax.random.PRNGKey(seed)); got None. Split a fresh key per call.")
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.ndim:
            raise ValueError(f"key must be a single PRNG key (vmap over a batch of keys); got a "
                             f"key array of shape {tuple(key.shape)}.")
        return
    if dtype == jnp.uint32 and getattr(key, "shape", None) == (2,):
        return
    raise TypeError(
        "key must be a PRNG key, typed (jax.random.key) or legacy uint32[2] (jax.random.PRNGKey); "
        f"got {key!r:.80}" + (f" of dtype {dtype} and shape {tuple(key.shape)}." if dtype else ".")
    )


def _check_broadcast_dims(broadcast_dims: Any, ndim: int) -> tuple[int, ...]:
    try:
        dims = tuple(broadcast_dims)
    except TypeError:
        raise TypeError(f"broadcast_dims must be a tuple of ints; got {broadcast_dims!r}.") \
            from None
    normalized = []
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
            raise TypeError(f"broadcast_dims must be a tuple of ints; got {broadcast_dims!r}.")
        if not -ndim <= d < ndim:
            raise ValueError(f"broadcast_dims entries must be in [{-ndim}, {ndim}) for x of rank "
                             f"{ndim}; got {broadcast_dims!r}.")
        normalized.append(int(d) % ndim)
    return tuple(sorted(set(normalized)))


def dropout(key: jax.Array | None, x: jax.Array, *, rate: float | jax.Array, train: bool,
            broadcast_dims: tuple[int, ...] = ()) -> jax.Array:
    r"""Inverted dropout: zero each element with probability ``rate``, scale the rest.

    .. math::

        y = x \cdot \frac{m}{1 - \text{rate}}, \qquad m \sim \text{Bernoulli}(1 - \text{rate})

    ``rate`` is the *drop* probability (not the keep rate; as Flax, PyTorch and the 2016-17
    cs231n assignment). The scaling keeps ``E[y] = x``, so test mode is the identity.

    The backward is ``dy * m / (1 - rate)``. Its ``custom_vjp`` keeps the mask bit-packed, 1 bit
    per element, between forward and backward. Regenerating the mask from the key instead would
    keep no residual at all, but was measured slower (random bits cost more than streaming 1/32 of
    x's bytes): ``python -m experiments.benchmark`` times both.

    Shapes: ``x`` any shape; the mask has ``x``'s shape with size 1 along ``broadcast_dims``.

    Args:
      key: a PRNG key, typed (``jax.random.key``) or legacy (``jax.random.PRNGKey``); the same
        key gives the same mask. May be ``None`` when ``train=False`` or ``rate == 0``.
      x: input, floating; the output keeps its dtype.
      rate: drop probability in [0, 1]. ``0`` is the identity; ``1`` gives zeros (and zero
        gradients, never NaN). It may be a traced scalar under ``jit`` (a schedule); a concrete
        value is range-checked, a traced one is taken as it comes.
      train: Python bool; ``False`` returns ``x`` unchanged.
      broadcast_dims: axes along which one mask value is shared, e.g. ``(2, 3)`` on NCHW
        features for channel-wise ("spatial") dropout.

    Returns:
      ``y`` of ``x``'s shape and dtype.

    Raises:
      TypeError: non-bool ``train``, non-floating ``x``, missing or non-key ``key`` in train mode.
      ValueError: ``rate`` outside [0, 1], ``broadcast_dims`` out of range.

    Example:
      >>> import jax, jax.numpy as jnp, jaxbn
      >>> x = jnp.ones((4, 5))
      >>> y = jaxbn.dropout(jax.random.key(0), x, rate=0.5, train=True)
      >>> sorted(set(y.ravel().tolist()))  # dropped, or kept and scaled by 1 / (1 - rate)
      [0.0, 2.0]
      >>> bool(jnp.all(jaxbn.dropout(None, x, rate=0.5, train=False) == x))  # test mode
      True
    """
    _checks.check_train(train)
    traced = isinstance(rate, jax.core.Tracer)
    if isinstance(rate, jax.core.Tracer):
        if rate.shape != () or not jnp.issubdtype(rate.dtype, jnp.floating):
            raise TypeError(f"rate must be a scalar float; got a traced {rate.dtype} of shape "
                            f"{tuple(rate.shape)}.")
    else:
        rate = _checks.check_real("rate", rate, low=0.0, high=1.0)
    x = _checks.check_float_array("x", x)
    dims = _check_broadcast_dims(broadcast_dims, x.ndim)
    if not train or (not traced and rate == 0.0):
        if key is not None and train:
            _check_key(key)
        return x
    _check_key(key)
    if not traced and rate == 1.0:
        return jnp.zeros_like(x)
    mask_shape = tuple(1 if a in dims else n for a, n in enumerate(x.shape))
    keep_prob, scale = _keep_prob_and_scale(rate, _checks.stat_dtype(x.dtype))
    return _dropout_core(key, x, keep_prob, scale, mask_shape)


def _keep_prob_and_scale(rate: Any, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """The keep probability in JAX's default float dtype, and the scale ``1 / (1 - rate)``.

    The keep probability is what ``jax.random.bernoulli(key, 1.0 - rate)`` compares against, so
    the same key drops the same elements as Flax's and Equinox's dropout. Rate 1 gets a scale of
    0 (a traced rate may reach it), so that its outputs and gradients are 0, never NaN.
    """
    if not isinstance(rate, jax.core.Tracer):
        return jnp.asarray(1.0 - rate), jnp.asarray(1.0 / (1.0 - rate), dtype)
    safe = jnp.where(rate < 1, 1.0 - rate, 1.0).astype(dtype)
    return 1.0 - rate, jnp.where(rate < 1, 1.0 / safe, 0.0).astype(dtype)


def _keep_mask(key: jax.Array, keep_prob: jax.Array, mask_shape: tuple[int, ...]) -> jax.Array:
    return jax.random.bernoulli(key, keep_prob, mask_shape)


def _apply_mask(a: jax.Array, keep: jax.Array, scale: jax.Array) -> jax.Array:
    # The scaling happens in float32 (or wider) so that bfloat16 inputs are rounded once.
    return jnp.where(keep, a.astype(scale.dtype) * scale, 0).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _dropout_core(key, x, keep_prob, scale, mask_shape):
    return _apply_mask(x, _keep_mask(key, keep_prob, mask_shape), scale)


def _dropout_core_fwd(key, x, keep_prob, scale, mask_shape):
    keep = _keep_mask(key, keep_prob, mask_shape)
    # Residual: the mask packed 8 elements to a byte (1 bit per element).
    return _apply_mask(x, keep, scale), (jnp.packbits(keep.reshape(-1)), scale)


def _dropout_core_bwd(mask_shape, residuals, dy):
    """``y = x * m * scale`` is linear in x, so ``dx = dy * m * scale``, ``scale = 1/(1 - rate)``;
    no gradient for the key, the keep probability or the rate."""
    packed_mask, scale = residuals
    size = int(np.prod(mask_shape))
    keep = jnp.unpackbits(packed_mask, count=size).reshape(mask_shape).astype(bool)
    return None, _apply_mask(dy, keep, scale), None, jnp.zeros_like(scale)


_dropout_core.defvjp(_dropout_core_fwd, _dropout_core_bwd)
