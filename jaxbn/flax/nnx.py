"""``flax.nnx`` layers computed by jaxbn: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``, ``Dropout``.

Each is a subclass of the ``flax.nnx`` layer of the same name: the same constructor and call
arguments with the same defaults (``momentum=0.99`` weighting the old running value, ``epsilon``,
``use_running_average``, ``axis``, ``axis_name``, ``use_scale``, ``use_bias``, ``rngs``, ``mask=``),
the same variables (``scale``/``bias`` as ``nnx.Param``, ``mean``/``var`` as ``nnx.BatchStat``),
``model.train()``/``model.eval()``/``nnx.view`` and ``isinstance(layer, nnx.BatchNorm)``. Replacing
``nnx.BatchNorm`` by ``jaxbn.flax.nnx.BatchNorm`` changes no other line and loads the same
checkpoints. The call runs jaxbn's hand-written VJP (one residual the size of x), computes
statistics in float32 with a two-pass variance, and takes jaxbn's options keyword-only:
``backward``, ``running_var``, ``virtual_batch_size``, ``renorm`` (see :func:`jaxbn.batch_norm`).

Differences from Flax, on purpose:
  * ``use_fast_variance`` is accepted and ignored: the variance never cancels catastrophically.
  * With ``mask``, masked-out positions output 0 (Flax normalizes them too); the valid outputs,
    the statistics and the gradients agree. The mask must not vary along the feature axis.
  * ``Dropout`` draws the same mask from the same key and scales by ``1 / (1 - rate)`` in float32
    (Flax divides in the input dtype): bfloat16 outputs may differ by one rounding.
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

_MODE_FIX = ("pass use_running_average=True/False to the constructor or the call, or use "
             "model.train() / model.eval() / nnx.view.")


def _promoted(layer, x):
    """x, scale and bias in the dtype Flax computes in (``promote_dtype``, a layer attribute
    since Flax 0.12)."""
    promote = getattr(layer, "promote_dtype", _dtypes.promote_dtype)
    params = (None if p is None else p[...] for p in (layer.scale, layer.bias))
    return promote((x, *params), dtype=layer.dtype)


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with jaxbn's computation: see the module docstring.

    Args:
      num_features, **flax_options: as ``flax.nnx.BatchNorm``.
      backward: ``"alt"`` (default), ``"graph"`` or ``"autodiff"``, as in :func:`jaxbn.batch_norm`.
      running_var: ``"biased"`` (default, Flax's) or ``"unbiased"`` (PyTorch's).
      virtual_batch_size: ghost batch norm over groups of this many examples.
      renorm: batch renormalization, ``dict(r_max=..., d_max=...)``.
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
        frozen = _adapter.choose("use_running_average", use_running_average,
                                 self.use_running_average, _MODE_FIX)
        x, scale, bias = _promoted(self, x)
        y, mean, var = _adapter.flax_batch_norm(
            x, scale, bias, self.mean[...], self.var[...], use_running_average=frozen,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=self.axis_name, axis_index_groups=self.axis_index_groups, mask=mask,
            backward=self.backward, running_var=self.running_var,
            virtual_batch_size=self.virtual_batch_size,
            renorm=dict(self.renorm) if isinstance(self.renorm, tuple) else self.renorm)
        if not frozen:
            self.mean[...] = mean.astype(self.mean.dtype)
            self.var[...] = var.astype(self.var.dtype)
        return y


class LayerNorm(nnx.LayerNorm):
    """``flax.nnx.LayerNorm`` with jaxbn's computation (``reduction_axes`` trailing, the
    parameters along ``feature_axes`` among them); ``backward`` keyword-only."""

    def __init__(self, num_features: int, *, backward: str = "alt", **flax_options: Any):
        super().__init__(num_features, **flax_options)
        self.backward = backward

    def __call__(self, x, *, mask=None):
        _adapter.unsupported("LayerNorm", axis_name=self.axis_name)
        x, scale, bias = _promoted(self, x)
        return _adapter.flax_layer_norm(x, scale, bias, epsilon=self.epsilon,
                                        reduction_axes=self.reduction_axes,
                                        feature_axes=self.feature_axes, mask=mask,
                                        backward=self.backward)


class GroupNorm(nnx.GroupNorm):
    """``flax.nnx.GroupNorm`` (channels last) with jaxbn's computation; ``backward``
    keyword-only."""

    def __init__(self, num_features: int, num_groups: int | None = 32,
                 group_size: int | None = None, *, backward: str = "alt", **flax_options: Any):
        super().__init__(num_features, num_groups, group_size, **flax_options)
        self.backward = backward

    def __call__(self, x, *, mask=None):
        _adapter.unsupported("GroupNorm", axis_name=self.axis_name)
        x, scale, bias = _promoted(self, x)
        return _adapter.flax_group_norm(x, scale, bias, num_groups=self.num_groups,
                                        epsilon=self.epsilon, reduction_axes=self.reduction_axes,
                                        mask=mask, backward=self.backward)


class Dropout(nnx.Dropout):
    """``flax.nnx.Dropout`` on :func:`jaxbn.dropout`: the same key stream and the same mask,
    with jaxbn's bit-packed residual."""

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        frozen = _adapter.choose("deterministic", deterministic, self.deterministic,
                                 "pass deterministic=True/False to the constructor or the call, "
                                 "or use model.train() / model.eval() / nnx.view.")
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
            raise ValueError("Dropout is in training mode (deterministic=False) but has no rngs: "
                             "pass rngs=nnx.Rngs(dropout=...) to the constructor or the call.")
        if isinstance(rngs, nnx.Rngs):
            return rngs[self.rng_collection]()
        if isinstance(rngs, nnx.RngStream):
            return rngs()
        return rngs
