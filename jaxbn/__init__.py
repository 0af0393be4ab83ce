"""jaxbn: batch normalization, its relatives and dropout for JAX, with hand-written VJPs."""

from jaxbn._batch_norm import BatchNormState, batch_norm, init_batch_norm_state, spatial_batch_norm

__all__ = [
    "BatchNormState",
    "batch_norm",
    "init_batch_norm_state",
    "spatial_batch_norm",
]

__version__ = "0.1.0"
