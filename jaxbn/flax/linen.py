"""``flax.linen`` layers computed by jaxbn: ``BatchNorm``, ``LayerNorm``, ``GroupNorm``,
``Dropout``.

Each is a subclass of the ``flax.linen`` layer of the same name, with the same fields and defaults
(``use_running_average``, ``axis``, ``momentum=0.99``, ``epsilon``, ``axis_name``, ...), the same
call signature and the same variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``,
``var``), so that ``nn.BatchNorm`` → ``jaxbn.flax.linen.BatchNorm`` changes no other line and
restores the same checkpoints. jaxbn's options are extra fields with defaults: ``backward``,
``running_var``, ``virtual_batch_size``, ``renorm`` (see :func:`jaxbn.batch_norm`). The
differences from Flax (``use_fast_variance`` ignored, masked-out outputs 0, dropout scaling in
float32) are those listed in :mod:`jaxbn.flax.nnx`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax.numpy as jnp

from jaxbn import _adapter
from jaxbn._dropout import bernoulli_dropout

if TYPE_CHECKING:
    from flax import linen as nn
else:  # an ImportError that names the extra to install
    nn = _adapter.require("flax.linen", "flax")

__all__ = ["BatchNorm", "Dropout", "GroupNorm", "LayerNorm"]


def _param(module, name: str, use: bool, init, shape) -> Any:
    return module.param(name, init, shape, module.param_dtype) if use else None


class BatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with jaxbn's computation: see the module docstring."""

    backward: str = "alt"
    running_var: str = "biased"
    virtual_batch_size: int | None = None
    renorm: Any = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        frozen = nn.merge_param("use_running_average", self.use_running_average,
                                use_running_average)
        shape = (x.shape[_adapter.canonical_axes("axis", self.axis, x.ndim)[0]],)
        stat_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape, stat_dtype))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(shape, stat_dtype))
        scale = _param(self, "scale", self.use_scale, self.scale_init, shape)
        bias = _param(self, "bias", self.use_bias, self.bias_init, shape)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        initializing = self.is_initializing()
        y, mean, var = _adapter.flax_batch_norm(
            x, scale, bias, ra_mean.value, ra_var.value, use_running_average=frozen,
            axis=self.axis, momentum=self.momentum, epsilon=self.epsilon,
            axis_name=None if initializing else self.axis_name,
            axis_index_groups=self.axis_index_groups, mask=mask, backward=self.backward,
            running_var=self.running_var, virtual_batch_size=self.virtual_batch_size,
            renorm=self.renorm)
        if not frozen and not initializing:
            ra_mean.value = mean.astype(stat_dtype)
            ra_var.value = var.astype(stat_dtype)
        return y


class LayerNorm(nn.LayerNorm):
    """``flax.linen.LayerNorm`` with jaxbn's computation; ``backward`` an extra field."""

    backward: str = "alt"

    @nn.compact
    def __call__(self, x, *, mask=None):
        _adapter.unsupported("LayerNorm", axis_name=self.axis_name)
        features = _adapter.canonical_axes("feature_axes", self.feature_axes, x.ndim)
        shape = tuple(x.shape[a] for a in features)
        scale = _param(self, "scale", self.use_scale, self.scale_init, shape)
        bias = _param(self, "bias", self.use_bias, self.bias_init, shape)
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        return _adapter.flax_layer_norm(x, scale, bias, epsilon=self.epsilon,
                                        reduction_axes=self.reduction_axes,
                                        feature_axes=self.feature_axes, mask=mask,
                                        backward=self.backward)


class GroupNorm(nn.GroupNorm):
    """``flax.linen.GroupNorm`` (channels last) with jaxbn's computation; ``backward`` an extra
    field."""

    backward: str = "alt"

    @nn.compact
    def __call__(self, x, *, mask=None):
        _adapter.unsupported("GroupNorm", axis_name=self.axis_name)
        channels = x.shape[-1]
        if (self.num_groups is None) == (self.group_size is None):
            raise ValueError(f"give exactly one of num_groups and group_size; got "
                             f"num_groups={self.num_groups}, group_size={self.group_size}.")
        if self.group_size is not None and channels % self.group_size:
            raise ValueError(f"group_size must divide the {channels} channels of x; got "
                             f"{self.group_size}.")
        groups = self.num_groups if self.group_size is None else channels // self.group_size
        scale = _param(self, "scale", self.use_scale, self.scale_init, (channels,))
        bias = _param(self, "bias", self.use_bias, self.bias_init, (channels,))
        x, scale, bias = nn.dtypes.promote_dtype(x, scale, bias, dtype=self.dtype)
        return _adapter.flax_group_norm(x, scale, bias, num_groups=groups,
                                        epsilon=self.epsilon, reduction_axes=self.reduction_axes,
                                        mask=mask, backward=self.backward)


class Dropout(nn.Dropout):
    """``flax.linen.Dropout`` on :func:`jaxbn.dropout`: the same ``dropout`` rng stream and the
    same mask, with jaxbn's bit-packed residual."""

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None, rng=None):
        frozen = nn.merge_param("deterministic", self.deterministic, deterministic)
        if frozen or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:  # Flax draws no key here: keep the rng stream in step with it
            return jnp.zeros_like(inputs)
        key = self.make_rng(self.rng_collection) if rng is None else rng
        return bernoulli_dropout(key, inputs, rate=self.rate,
                                 broadcast_dims=tuple(self.broadcast_dims))
