"""Inverted dropout with explicit PRNG keys."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

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

        y = x \cdot \frac{m}{q}, \qquad m \sim \text{Bernoulli}(q), \qquad
        q = \frac{\operatorname{round}((1 - \text{rate})\, 2^b)}{2^b}

    ``rate`` is the *drop* probability (not the keep rate; as Flax, PyTorch and the 2016-17
    cs231n assignment). The scaling by the realized keep probability ``q`` keeps ``E[y] = x``
    exactly, so test mode is the identity.

    Random bits are what dropout costs, so each element compares ``b`` random bits (not 32)
    against the threshold ``round((1 - rate) 2^b)``: ``b = 8`` when ``rate`` is a multiple of
    1/256 (0.5, 0.25, 0.125, ...: then ``q = 1 - rate`` exactly), else ``b = 16``, which realizes
    the rate to within 2^-17 (7.6e-6; rate 0.1 drops with probability 0.1000061). A traced rate
    takes 16 bits. Element ``(..., j)`` reads bits ``[b (j mod 32/b), b (j mod 32/b) + b)`` of
    word ``(..., j // (32/b))`` of ``jax.random.bits(key, shape[:-1] + (ceil(n / (32/b)),))``,
    so the mask depends only on the key and each element's position, never on how the array is
    sharded (JAX's threefry is partitionable), and one random word serves 4 (or 2) elements.
    The same key gives the same mask; it is not the mask of ``jax.random.bernoulli`` (the Flax
    and Equinox adapters draw theirs with :func:`bernoulli_dropout`, as their frameworks do).

    The backward is ``dy * m / q``. Its ``custom_vjp`` keeps no residual the size of ``x``: it
    draws the mask again from the key (cheaper than storing and reloading it, measured by
    ``python -m experiments.benchmark``).

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
    return _dropout(key, x, rate=rate, train=train, broadcast_dims=broadcast_dims, draw="bits")


def _dropout(key, x, *, rate, train, broadcast_dims, draw: str) -> jax.Array:
    """:func:`dropout`'s checks and dispatch, for either draw."""
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
    plan, threshold, scale = _plan_draw(rate, _checks.stat_dtype(x.dtype), draw)
    return _dropout_core(key, x, threshold, scale, mask_shape, plan)


def bernoulli_dropout(key: jax.Array, x: jax.Array, *, rate: float | jax.Array,
                      broadcast_dims: tuple[int, ...] = ()) -> jax.Array:
    """Train-mode :func:`dropout` whose keep decision is ``jax.random.bernoulli(key, 1 - rate)``
    's, element for element: the mask Flax's and Equinox's dropout draw from the same key.

    The framework adapters use it, so that swapping the import keeps a model's masks; it draws
    32 random bits per element (:func:`dropout` draws 8 or 16) and keeps the mask bit-packed,
    1 bit per element, for the backward.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn._dropout import bernoulli_dropout
      >>> key, x = jax.random.key(0), jnp.ones((4, 5))
      >>> kept = bernoulli_dropout(key, x, rate=0.3) != 0
      >>> bool(jnp.all(kept == jax.random.bernoulli(key, 0.7, x.shape)))
      True
    """
    return _dropout(key, x, rate=rate, train=True, broadcast_dims=broadcast_dims,
                    draw="bernoulli")


class Draw(NamedTuple):
    """How the keep decisions are drawn (static): ``"bits"`` with ``bits`` random bits per
    element, or ``"bernoulli"`` (``jax.random.bernoulli``'s draw)."""

    kind: str
    bits: int = 32


def _plan_draw(rate: Any, dtype: Any, kind: str) -> tuple[Draw, jax.Array, jax.Array]:
    """``(draw, threshold, scale)``: keep where the drawn value is below ``threshold``, and scale
    the kept values by ``1 / q``, ``q`` the realized keep probability. A rate of 1 (a traced rate
    may reach it) gets a scale of 0, so that its outputs and gradients are 0, never NaN."""
    keep = 1.0 - rate
    if kind == "bernoulli":
        if not isinstance(rate, jax.core.Tracer):
            return Draw(kind), jnp.asarray(keep), jnp.asarray(1.0 / keep, dtype)
        safe = jnp.where(rate < 1, keep, 1.0).astype(dtype)
        return Draw(kind), keep, jnp.where(rate < 1, 1.0 / safe, 0.0).astype(dtype)
    if not isinstance(rate, jax.core.Tracer):
        bits = 8 if float(keep * 256).is_integer() else 16
        t = round(keep * (1 << bits))
        scale = (1 << bits) / t if t else 0.0
        return Draw(kind, bits), jnp.asarray(t, jnp.uint32), jnp.asarray(scale, dtype)
    levels = jnp.clip(jnp.round(keep * 65536.0), 0, 65536)
    scale = jnp.where(levels > 0, 65536.0 / jnp.maximum(levels, 1), 0.0).astype(dtype)
    return Draw(kind, 16), levels.astype(jnp.uint32), scale


def _keep_mask(key: jax.Array, threshold: jax.Array, mask_shape: tuple[int, ...],
               draw: Draw) -> jax.Array:
    """The boolean keep mask of ``mask_shape`` (see :func:`dropout` for the bit layout)."""
    if draw.kind == "bernoulli":
        return jax.random.bernoulli(key, threshold, mask_shape)
    shape = mask_shape or (1,)
    per_word = 32 // draw.bits
    groups = -(-shape[-1] // per_word)
    words = jax.random.bits(key, shape[:-1] + (groups,), jnp.uint32)
    shifts = np.arange(per_word, dtype=np.uint32) * np.uint32(draw.bits)
    values = (words[..., None] >> shifts) & np.uint32((1 << draw.bits) - 1)
    values = values.reshape(shape[:-1] + (groups * per_word,))[..., :shape[-1]]
    return (values < threshold).reshape(mask_shape)


def _apply_mask(a: jax.Array, keep: jax.Array, scale: jax.Array) -> jax.Array:
    # The scaling happens in float32 (or wider) so that bfloat16 inputs are rounded once.
    return jnp.where(keep, a.astype(scale.dtype) * scale, 0).astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dropout_core(key, x, threshold, scale, mask_shape, draw):
    return _apply_mask(x, _keep_mask(key, threshold, mask_shape, draw), scale)


def _dropout_core_fwd(key, x, threshold, scale, mask_shape, draw):
    keep = _keep_mask(key, threshold, mask_shape, draw)
    if draw.kind == "bits":  # residual: the key (the backward draws the mask again)
        return _apply_mask(x, keep, scale), (key, threshold, scale)
    # Residual: the mask packed 8 elements to a byte (1 bit per element).
    return _apply_mask(x, keep, scale), (jnp.packbits(keep.reshape(-1)), threshold, scale)


def _dropout_core_bwd(mask_shape, draw, residuals, dy):
    """``y = x * m * scale`` is linear in x, so ``dx = dy * m * scale``, ``scale = 1 / q``; no
    gradient for the key, the threshold or the rate."""
    saved, threshold, scale = residuals
    if draw.kind == "bits":
        keep = _keep_mask(saved, threshold, mask_shape, draw)
    else:
        size = int(np.prod(mask_shape))
        keep = jnp.unpackbits(saved, count=size).reshape(mask_shape).astype(bool)
    return None, _apply_mask(dy, keep, scale), None, None


_dropout_core.defvjp(_dropout_core_fwd, _dropout_core_bwd)
