"""Argument checks shared by the public functions.

Every check runs at trace time on static information (shapes, dtypes, Python options) and raises a
``ValueError`` or ``TypeError`` that names the argument, what was expected and what came.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _static_hint(name: str) -> str:
    return (f" It configures the computation at trace time, so it cannot be a traced value: mark "
            f"it static (jax.jit(f, static_argnames=({name!r},))) or close over it "
            f"(functools.partial(f, {name}=...)).")


def check_train(train: Any) -> None:
    """``train`` selects a code path at trace time, so it must be a Python bool."""
    if isinstance(train, jax.core.Tracer):
        raise TypeError(f"train must be a Python bool (True for batch statistics, False for "
                        f"running statistics); got a traced value {train}." + _static_hint("train"))
    if not isinstance(train, (bool, np.bool_)):
        raise TypeError(
            f"train must be a Python bool (True for batch statistics, False for running "
            f"statistics); got {train!r} of type {type(train).__name__}."
        )


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"{name} must be one of {allowed}; got {value!r}.")


def default_float() -> jnp.dtype:
    """JAX's default float: float32, float64 with ``jax_enable_x64``."""
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def check_float_array(name: str, x: Any, *, complex_ok: bool = False) -> jax.Array:
    """Returns ``x`` as a floating array: floating dtypes as they are, integers promoted to JAX's
    default float (as ``x * 1.0`` would promote them); complex dtypes where ``complex_ok``;
    anything else is refused."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = jnp.asarray(x)
    dtype = jnp.dtype(x.dtype)
    if jnp.issubdtype(dtype, jnp.floating) or (complex_ok and is_complex(dtype)):
        return jnp.asarray(x)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.asarray(x, default_float())
    kinds = "floating (float16, bfloat16, float32 or float64)" + (
        ", complex (complex64 or complex128)" if complex_ok else "")
    raise TypeError(f"{name} must be a {kinds} or integer array; got dtype {dtype}.")


def is_complex(dtype: Any) -> bool:
    return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.complexfloating))


def check_ndim(name: str, x: jax.Array, *, min_ndim: int | None = None,
               ndim: int | None = None, what: str = "") -> None:
    hint = f" ({what})" if what else ""
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions{hint}; got shape {tuple(x.shape)}.")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimensions{hint}; got shape {tuple(x.shape)}."
        )


def check_param(name: str, p: Any, num_features: int, what: str) -> jax.Array:
    """Checks a per-feature vector: floating, exactly shape ``(num_features,)``.

    Shapes such as ``(1, D)`` would broadcast silently, so they are rejected too.
    """
    p = check_float_array(name, p)
    if tuple(p.shape) != (num_features,):
        raise ValueError(
            f"{name} must have shape ({num_features},), one value per {what}; "
            f"got shape {tuple(p.shape)}."
        )
    return p


def check_axis(name: str, axis: Any, ndim: int) -> int:
    """Returns ``axis`` normalized to ``[0, ndim)``."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name} must be an int; got {axis!r} of type {type(axis).__name__}.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name} must be in [{-ndim}, {ndim}) for an input of rank {ndim}; "
                         f"got {axis}.")
    return int(axis) % ndim


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}.")
    return int(value)


def check_real(name: str, value: Any, *, low: float, high: float | None = None,
               low_open: bool = False) -> float:
    """Returns ``value`` as a Python float after checking that it lies in range.

    The value must be concrete (a Python or numpy number): it configures the computation.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a Python number; got a traced value {value}."
                        + _static_hint(name))
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise TypeError(
            f"{name} must be a Python number; got {value!r} of type {type(value).__name__}."
        )
    value = float(value)
    bad_low = value <= low if low_open else value < low
    bad_high = high is not None and value > high
    if bad_low or bad_high or not np.isfinite(value):
        left = "(" if low_open else "["
        right = f"{high}]" if high is not None else "inf)"
        raise ValueError(f"{name} must be in {left}{low}, {right}; got {value}.")
    return value


def common_dtype(*dtypes: Any) -> jnp.dtype:
    """JAX's standard promotion of floating and complex dtypes (bfloat16 with float16 gives
    float32, a real dtype with a complex one the complex dtype of the wider precision), computed
    without ``jnp.result_type``/``jnp.promote_types``, which refuse mixed dtypes under
    ``jax.numpy_dtype_promotion("strict")``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxbn._checks import common_dtype
      >>> with jax.numpy_dtype_promotion("strict"):
      ...     [common_dtype(*d).name for d in [(jnp.bfloat16, jnp.float16),
      ...                                      (jnp.float32, jnp.bfloat16),
      ...                                      (jnp.float64, jnp.complex64)]]
      ['float32', 'float32', 'complex128']
    """
    unique = {jnp.dtype(d) for d in dtypes}
    if len(unique) == 1:
        return unique.pop()
    bits = max(jnp.finfo(d).bits for d in unique)  # complex64's parts are 32-bit
    real = jnp.dtype(jnp.float64 if bits > 32 else jnp.float32)  # two 16-bit types meet at 32
    if any(is_complex(d) for d in unique):
        return jnp.dtype(jnp.complex128 if real == jnp.float64 else jnp.complex64)
    return real


def stat_dtype(*dtypes: Any) -> jnp.dtype:
    """The dtype statistics are accumulated in: float32, or float64 when an input is float64
    (complex64/complex128 when an input is complex: the mean of complex values is complex).

    Chosen without ``jnp.result_type``, so that it holds under
    ``jax.numpy_dtype_promotion("strict")`` for bfloat16/float16 inputs too.
    """
    return common_dtype(jnp.float32, *dtypes)


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real dtype of a floating or complex dtype (complex64 -> float32): the variance's."""
    return jnp.dtype(jnp.finfo(dtype).dtype)


def check_bool_mask(mask: Any) -> jax.Array:
    """``mask`` as a boolean array (True = valid entry)."""
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid entry); got dtype "
                        f"{mask.dtype}.")
    return mask
