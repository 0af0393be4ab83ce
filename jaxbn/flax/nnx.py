"""``flax.nnx`` layers computed by jaxbn: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``Dropout``.

Each is a subclass of the ``flax.nnx`` layer of the same name: the same constructor and call
arguments with the same defaults (``momentum=0.99`` weighting the old running value, ``epsilon``,
``use_running_average``, ``axis``, ``axis_name``, ``use_scale``, ``use_bias``, ``dtype``,
``promote_dtype``, ``rngs``, ``mask=``), the same variables (``scale``/``bias`` as ``nnx.Param``,
``mean``/``var`` as ``nnx.BatchStat``), ``model.train()``/``model.eval()``/``nnx.view``,
``isinstance(layer, nnx.BatchNorm)``, NNX's error messages and exception types, and the NNX
transforms (``nnx.jit``, ``nnx.vmap``, ``nnx.scan``, ``nnx.remat``, ``nnx.eval_shape``,
``nnx.bridge``, ``nnx.tabulate``). Replacing ``nnx.BatchNorm`` by ``jaxbn.flax.nnx.BatchNorm``
changes no other line and loads the same checkpoints. Batches of one, complex input, masks that
vary along the features and layer/group norm over any ``reduction_axes`` Flax accepts work as in
Flax. The call runs jaxbn's hand-written VJP (one residual the size of x), computes statistics in
float32 with a two-pass variance, works under ``jax.numpy_dtype_promotion("strict")``, and takes
jaxbn's options keyword-only: ``backward``, ``running_var``, ``virtual_batch_size``, ``renorm``
(see :func:`jaxbn.batch_norm`).

Differences from Flax, on purpose (these and no others, for :mod:`jaxbn.flax.linen` too):
  * ``use_fast_variance`` is accepted and ignored: the variance is two-pass and never cancels.
    On float32 data of std 1 at offset 300, Flax's default batch variance is 0.018 off;
    jaxbn's is exact to the rounding of the float32 mean.
  * With ``mask``, masked-out entries output 0 in train mode (Flax normalizes them too); the
    valid outputs, the statistics and the gradients agree. ``bn(x, mask=m)`` is 0 where ``m``
    is False; Flax's is ``(x - mean) / std`` there.
  * A feature without a valid entry keeps its running statistics: with ``m[:, 0]`` all False,
    ``bn.mean[0]`` stays as it was; Flax's becomes NaN.
  * With ``mask`` and ``axis_name``, each device's statistics count by its valid entries (the
    statistics of the global batch); Flax averages the devices' masked means with equal
    weights. Devices with 4 and 1 valid rows: jaxbn's mean is that of the 5 rows.
  * ``axis`` names one feature axis: Linen's ``BatchNorm(axis=(1, 2))`` (parameters over two
    axes) raises ``ValueError``.
  * Linen's ``force_float32_reductions=False`` still computes the statistics in float32 (the
    running statistics take ``param_dtype``, as in Linen): bfloat16 statistics are not offered.
  * In bfloat16/float16, jaxbn computes in float32 and rounds once: NNX rounds the running
    statistics to ``dtype`` in eval mode first, and ``Dropout`` scales by ``1 / (1 - rate)`` in
    float32 where Flax divides in the input dtype. ``dtype=jnp.bfloat16`` outputs may differ by
    a rounding or two (dropout at rate 0.3: some by one); the same key drops the same entries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from jaxbn import _adapter
from jaxbn._dropout import bernoulli_dropout

if TYPE_CHECKING:
    from flax import nnx
else:  # an ImportError that names the extra to install
    nnx = _adapter.require("flax.nnx", "flax")
from flax.nnx.nn import dtypes as _dtypes  # noqa: E402  (after the import check)

__all__ = ["BatchNorm", "Dropout", "GroupNorm", "LayerNorm"]

# Flax's own messages, which its users' code matches; the fix is in them.
_NO_MODE = (
    "No `{name}` argument was provided to {layer}. Consider one of the following options:\n\n"
    "1. Pass `{name}` to the {layer} constructor:\n\n"
    "  self.{attr} = nnx.{layer}(..., {name}=True/False)\n\n"
    "2. Pass `{name}` to the {layer} __call__:\n\n"
    "  self.{attr}(x, {name}=True/False)\n\n"
    "3. Use `nnx.view` to create a view of the model with a specific `{name}` value:\n\n"
    "  model_view = nnx.view(model, {name}=True/False)\n")
_NO_RNGS = ("`deterministic` is False, but no `rngs` argument was provided to Dropout\n"
            "          as either a __call__ argument or class attribute.")


def _mode(name: str, call_value, layer_value, layer: str, attr: str) -> bool:
    return _adapter.choose(name, call_value, layer_value, "", message=_NO_MODE.format(
        name=name, layer=layer, attr=attr))


def _promoted(layer, x, *arrays):
    """``(x, *arrays)`` as NNX computes with them, and the output's dtype.

    Since Flax 0.12 the layer's ``promote_dtype`` casts x with the running statistics and the
    parameters first (Flax's default is replaced by the same promotion computed so that it
    holds under strict dtype promotion); before, NNX used x as given and applied ``dtype`` to
    the output, as Linen does.
    """
    promote = getattr(layer, "promote_dtype", None)
    if promote is None:  # Flax < 0.12
        x, out = _adapter.linen_dtypes(x, arrays[-2:], layer.dtype)
        return (x, *arrays), out
    if promote is _dtypes.promote_dtype:
        promote = _adapter.promote
    promoted = promote((x, *arrays), dtype=layer.dtype)
    return promoted, jnp.dtype(promoted[0].dtype)


def _assign(layer, variable, value):
    """``variable[...] = value`` as the installed NNX does it: since Flax 0.12 the assignment
    casts to the variable's dtype (spelled out here, so that it holds under strict dtype
    promotion); before, it replaced the value."""
    if getattr(layer, "promote_dtype", None) is not None:
        value = value.astype(variable[...].dtype)
    variable[...] = value


def _value(variable):
    return None if variable is None else variable[...]


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with jaxbn's computation: see the module docstring.

    Args:
      num_features, **flax_options: as ``flax.nnx.BatchNorm``.
      backward: ``"alt"`` (default), ``"graph"`` or ``"autodiff"``, as in :func:`jaxbn.batch_norm`.
      running_var: ``"biased"`` (default, Flax's) or ``"unbiased"`` (PyTorch's).
      virtual_batch_size: ghost batch norm over groups of this many examples.
      renorm: batch renormalization, ``dict(r_max=..., d_max=...)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.flax import nnx as bn
      >>> layer = bn.BatchNorm(3, rngs=nnx.Rngs(0))
      >>> x = 2.0 * jax.random.normal(jax.random.key(0), (16, 3)) + 1.0
      >>> y = layer(x)  # train mode: batch statistics, running statistics updated
      >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.allclose(layer.mean[...],
      ...                                                                0.01 * x.mean(0)))
      (True, True)
    """

    def __init__(self, num_features: int, *, backward: str = "alt", running_var: str = "biased",
                 virtual_batch_size: int | None = None, renorm: dict | None = None,
                 **flax_options: Any):
        super().__init__(num_features, **flax_options)
        self.backward = backward
        self.running_var = running_var
        self.virtual_batch_size = virtual_batch_size
        # Static, as a tuple of pairs: nnx would take a dict attribute for a child node.
        self.renorm = tuple(sorted(renorm.items())) if isinstance(renorm, dict) else renorm

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        frozen = _mode("use_running_average", use_running_average, self.use_running_average,
                       "BatchNorm", "bn")
        (x, _, _, scale, bias), out = _promoted(self, x, self.mean[...], self.var[...],
                                                _value(self.scale), _value(self.bias))
        mean, var = self.mean[...], self.var[...]
        if not frozen:  # in the dtypes NNX's update gives them, then assigned as NNX assigns them
            mean, var = _adapter.updated_dtypes(mean, var, x.dtype, self.dtype)
        y, mean, var = _adapter.flax_batch_norm(
            x, scale, bias, mean, var, use_running_average=frozen,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask,
            backward=self.backward, running_var=self.running_var,
            virtual_batch_size=self.virtual_batch_size,
            renorm=dict(self.renorm) if isinstance(self.renorm, tuple) else self.renorm)
        if not frozen:
            _assign(self, self.mean, mean)
            _assign(self, self.var, var)
        return y.astype(out)


class LayerNorm(nnx.LayerNorm):
    """``flax.nnx.LayerNorm`` with jaxbn's computation (statistics over ``reduction_axes``, the
    parameters along ``feature_axes``, any axes of x); ``backward`` keyword-only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.flax import nnx as bn
      >>> layer = bn.LayerNorm(4, reduction_axes=1, feature_axes=1, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (2, 4, 3)))  # over a middle axis
      >>> bool(jnp.allclose(y.mean(1), 0, atol=1e-6))
      True
    """

    def __init__(self, num_features: int, *, backward: str = "alt", **flax_options: Any):
        super().__init__(num_features, **flax_options)
        self.backward = backward

    def __call__(self, x, *, mask=None):
        (x, scale, bias), out = _promoted(self, x, _value(self.scale), _value(self.bias))
        return _adapter.flax_layer_norm(self, x, scale, bias, mask).astype(out)


class GroupNorm(nnx.GroupNorm):
    """``flax.nnx.GroupNorm`` (channels last, statistics over any ``reduction_axes`` that end
    with them) with jaxbn's computation; ``backward`` keyword-only.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.flax import nnx as bn
      >>> layer = bn.GroupNorm(8, num_groups=2, rngs=nnx.Rngs(0))
      >>> y = layer(jax.random.normal(jax.random.key(0), (2, 5, 8)))
      >>> per_group = y.reshape(2, 5, 2, 4)  # (example, position, group, channel in group)
      >>> bool(jnp.allclose(per_group.mean((1, 3)), 0, atol=1e-6))
      True
    """

    def __init__(self, num_features: int, num_groups: int | None = 32,
                 group_size: int | None = None, *, backward: str = "alt", **flax_options: Any):
        super().__init__(num_features, num_groups, group_size, **flax_options)
        self.backward = backward

    def __call__(self, x, *, mask=None):
        (x, scale, bias), out = _promoted(self, x, _value(self.scale), _value(self.bias))
        return _adapter.flax_group_norm(self, x, scale, bias, self.num_groups,
                                        mask).astype(out)


class Dropout(nnx.Dropout):
    """``flax.nnx.Dropout`` with jaxbn's backward: the same key stream and the same mask,
    with jaxbn's bit-packed residual.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxbn.flax import nnx as bn
      >>> x = jnp.ones((4, 5))
      >>> y, y_flax = bn.Dropout(0.5, rngs=nnx.Rngs(1))(x), nnx.Dropout(0.5, rngs=nnx.Rngs(1))(x)
      >>> bool(jnp.all(y == y_flax))  # the same mask from the same key
      True
    """

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        frozen = _mode("deterministic", deterministic, self.deterministic, "Dropout", "dropout")
        if frozen or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:  # Flax draws no key here: keep the rng stream in step with it
            return jnp.zeros_like(inputs)
        return bernoulli_dropout(self._key(rngs), inputs, rate=self.rate,
                                 broadcast_dims=tuple(self.broadcast_dims))

    def _key(self, rngs):
        """The next key, drawn as ``flax.nnx.Dropout`` draws it."""
        rngs = self.rngs if rngs is None else rngs
        if rngs is None:
            raise ValueError(_NO_RNGS + " Pass rngs=nnx.Rngs(dropout=...) to the constructor or "
                             "the call.")
        if isinstance(rngs, nnx.Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        return rngs
