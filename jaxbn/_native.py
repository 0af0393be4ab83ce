"""The native CPU kernels (``jaxbn/_kernels.cc``, XLA FFI) behind the ``"alt"`` rule.

:func:`forward` and :func:`backward` are the CPU implementation of the formulas in
:mod:`jaxbn._rules` (``statistics`` + ``scale_shift``, ``alt_rule``) for batch norm: the same
inputs, outputs and residuals (plus ``Residuals.low``, two per-feature arrays that carry the
forward's float64 statistics to the backward), with every sum in float64 (exact to the final
rounding).
:func:`decide` says, once per call, whether they run: the extension was built (``pip install -e
.`` with a C++ compiler), the default backend is the CPU, the call is a batch norm whose layout
the kernels take (``Layout.native_view``), the rule is ``"alt"`` without mask or ``axis_name``,
``x``'s sharding is one the kernels can split (:func:`jaxbn._partition.supported`), and
``JAXBN_NATIVE`` is not ``0``; otherwise the jnp rules run. Each native call is a
``custom_jvp`` whose derivative is the jnp rule's, so reverse-over-reverse and ``jax.hessian``
differentiate exactly what the jnp path would. :mod:`jaxbn._partition` runs the kernels on each
device's shard of a sharded ``x`` and hands them ``jax.vmap``'s axis as independent batches
(statistics per batch, no serial loop).

The fused epilogue (``Config.activation``/``Config.residual``) runs inside the kernels' passes: the
forward adds the residual and applies the ReLU in its normalizing pass (one rounding), the
backward reads the forward's output ``y`` and masks ``dy`` by ``y > 0`` in both of its passes,
writing the masked cotangent as the residual's gradient where there is a residual. Split across
devices, the normalizing kernel still applies the epilogue; the backward's mask is applied by XLA
before the per-shard kernels.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp

from jaxbn import _partition, _rules

try:
    from jaxbn import _kernels
    _UNAVAILABLE = None
except ImportError as error:  # not built: no compiler at install time, or a source checkout
    _kernels = None
    _UNAVAILABLE = (f"the extension jaxbn._kernels is not built ({error}); reinstall with a C++ "
                    f"compiler: pip install -e .")

ENV = "JAXBN_NATIVE"  # "0" forces the jnp rules
# The kernels' operands and results (kInterface in jaxbn/_kernels.cc); bumped when they change.
_INTERFACE = 2
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)
_warned: list[bool] = []


@functools.cache
def _registration_error() -> str | None:
    """Registers the kernels with XLA once; the reason if XLA refuses them (an extension built
    against a newer jaxlib than the one installed) or they are another jaxbn's (an extension
    left from before an update of the source tree)."""
    built = getattr(_kernels, "INTERFACE", 1)
    if built != _INTERFACE:
        return (f"the extension jaxbn._kernels was built from another version of jaxbn (kernel "
                f"interface {built}, this jaxbn needs {_INTERFACE}); rebuild it: "
                f"pip install --no-build-isolation -e .")
    try:
        for name, capsule in _kernels.targets().items():
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except Exception as error:  # noqa: BLE001 - any refusal means "use the jnp rules"
        return (f"XLA refused the extension ({error}); rebuild it against the installed jaxlib: "
                f"pip install --no-build-isolation -e .")
    return None


def native_status() -> dict[str, Any]:
    """Whether jaxbn's native CPU kernels run, and why not if they do not.

    Returns:
      ``{"built": bool, "enabled": bool, "reason": str}``: ``built`` when the extension
      compiled at install time; ``enabled`` when batch norm's ``"alt"`` rule uses it on the CPU
      (``JAXBN_NATIVE=0`` in the environment turns it off); ``reason`` says which.

    Example:
      >>> import jaxbn
      >>> status = jaxbn.native_status()
      >>> sorted(status), isinstance(status["enabled"], bool)
      (['built', 'enabled', 'reason'], True)
    """
    if _kernels is None:
        return {"built": False, "enabled": False, "reason": _UNAVAILABLE}
    if _registration_error() is not None:
        return {"built": True, "enabled": False, "reason": _registration_error()}
    if os.environ.get(ENV, "1").lower() in ("0", "false", "off", "no"):
        return {"built": True, "enabled": False, "reason": f"{ENV}={os.environ[ENV]}"}
    return {"built": True, "enabled": True, "reason": "native CPU kernels in use"}


def _enabled() -> bool:
    status = native_status()
    usable = status["built"] and _registration_error() is None
    if not usable and not _warned and jax.default_backend() == "cpu":
        _warned.append(True)
        warnings.warn(f"jaxbn: native CPU kernels unavailable: {status['reason']}; batch norm "
                      f"runs its jnp rules (correct, slower on the CPU).", RuntimeWarning,
                      stacklevel=4)
    return status["enabled"] and jax.default_backend() == "cpu"


def decide(view: tuple[int, int, int] | None, x_dtype: Any, param_dtype: Any,
           x_type: Any = None) -> bool:
    """Whether the native kernels compute a batch norm whose layout has the kernel ``view``
    (``Layout.native_view``; None for every other normalization) on an ``x`` of type ``x_type``
    (``jax.typeof(x)``, for its sharding). Called once per call; the forward and the backward
    read the answer from the core's config."""
    if view is None or jnp.dtype(x_dtype) not in DTYPES:
        return False
    # The kernels take gamma and beta in the statistics' dtype: float32, or float64 for float64.
    wide = jnp.dtype(x_dtype) == jnp.float64
    if jnp.dtype(param_dtype) == jnp.float64 and not wide:
        return False
    if x_type is not None and not _partition.supported(x_type):
        return False
    return _enabled()


def _stat_dtype(x):
    return jnp.float64 if x.dtype == jnp.float64 else jnp.float32


def _kept(x, config):
    """The statistics' shape: x's with size 1 along the reduced axes."""
    return tuple(1 if a in config.stat_axes else n for a, n in enumerate(x.shape))


def _jnp_forward(x, gamma, beta, residual, config):
    mean, var = _rules.statistics(x, config, _stat_dtype(x))
    inv_std = jax.lax.rsqrt(var + config.eps)
    y = _rules.scale_shift(x, mean, inv_std, gamma, beta, residual, config.activation)
    return y, mean, var, inv_std, jnp.zeros_like(mean), jnp.zeros_like(inv_std)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def forward(x, gamma, beta, residual, config):
    """``(y, mean, var, inv_std, mean_low, inv_std_low)`` as the jnp rule computes them
    (statistics with x's rank, size 1 along the reduced axes), for ``config.native``, the feature
    axis of ``x``; ``y`` with the config's epilogue. ``mean_low`` and ``inv_std_low`` are what
    the float32 ``mean`` and ``inv_std`` leave out of the kernels' float64 ones (zero for
    float64 statistics): the fused backward takes the statistics from them, to 48 bits,
    instead of recomputing them in its sums pass."""
    stat, keep = _stat_dtype(x), _kept(x, config)
    y, *stats = _partition.forward(x, gamma.astype(stat).reshape(-1),
                                   beta.astype(stat).reshape(-1), residual, axis=config.native,
                                   eps=config.eps, relu=config.activation == "relu")
    return (y, *(a.reshape(keep) for a in stats))


@forward.defjvp
def _forward_jvp(config, primals, tangents):
    return jax.jvp(lambda *a: _jnp_forward(*a, config), primals, tangents)


def _jnp_backward(x, dy, mean, inv_std, gamma, out, low, config):
    del low  # the float32 statistics are the jnp rule's
    dz = _rules.epilogue_cotangent(config, out, dy)
    residuals = _rules.Residuals(x, mean, inv_std, gamma, out)
    return (*_rules.alt_rule(config, residuals, dz), dz if config.residual else dy)


def backward(dy, residuals, config):
    """``(dx, dgamma, dbeta, dz)`` as :func:`jaxbn._rules.alt_rule` computes them from the
    cotangent ``dz`` of the affine output (:func:`jaxbn._rules.epilogue_cotangent` of ``dy``)."""
    x, mean, inv_std, gamma, out, low = residuals
    return _backward(x, dy, mean, inv_std, gamma, out, low, config)


@functools.partial(jax.custom_jvp, nondiff_argnums=(7,))
def _backward(x, dy, mean, inv_std, gamma, out, low, config):
    stat = mean.dtype
    # The kernels write dz only where the residual needs it and differs from dy.
    want_dz = config.residual and out is not None
    dx, dgamma, dbeta, *dz = _partition.backward(
        x, dy.astype(x.dtype), mean.reshape(-1), low[0].reshape(-1), inv_std.reshape(-1),
        low[1].reshape(-1), gamma.astype(stat).reshape(-1), out, axis=config.native, dz=want_dz)
    return (dx, dgamma.reshape(gamma.shape).astype(gamma.dtype), dbeta.reshape(gamma.shape),
            dz[0] if dz else dy)


@_backward.defjvp
def _backward_jvp(config, primals, tangents):
    return jax.jvp(lambda *a: _jnp_backward(*a, config), primals, tangents)
