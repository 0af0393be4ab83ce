"""jaxbn: batch normalization, its relatives and dropout for JAX, with hand-written VJPs."""

from jaxbn._batch_norm import BatchNormState, batch_norm, init_batch_norm_state, spatial_batch_norm
from jaxbn._dropout import dropout
from jaxbn._inference import fold_batch_norm, recompute_batch_stats
from jaxbn._layer_norm import group_norm, layer_norm
from jaxbn._native import native_status

__all__ = [
    "BatchNormState",
    "batch_norm",
    "dropout",
    "fold_batch_norm",
    "group_norm",
    "init_batch_norm_state",
    "layer_norm",
    "native_status",
    "recompute_batch_stats",
    "spatial_batch_norm",
]

__version__ = "0.1.0"
