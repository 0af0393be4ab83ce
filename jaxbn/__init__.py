"""jaxbn: batch normalization, its relatives and dropout for JAX, with hand-written VJPs.

The functions below are imported with the package; the submodules ``jaxbn.nets``,
``jaxbn.training``, ``jaxbn.testing``, ``jaxbn.torch_compat``, ``jaxbn.reference``,
``jaxbn.cs231n``, ``jaxbn.flax`` and ``jaxbn.equinox`` are imported when first used as
attributes (``import jaxbn`` imports neither Flax, Equinox nor PyTorch).
"""

import importlib as _importlib

from jaxbn._batch_norm import BatchNormState, batch_norm, init_batch_norm_state, spatial_batch_norm
from jaxbn._dropout import dropout
from jaxbn._inference import fold_batch_norm, recompute_batch_stats
from jaxbn._layer_norm import group_norm, layer_norm
from jaxbn._native import native_status
from jaxbn._parallel import LOCAL

__all__ = [
    "LOCAL",
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

_SUBMODULES = ("cs231n", "equinox", "flax", "nets", "reference", "testing", "torch_compat",
               "training")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return _importlib.import_module(f"jaxbn.{name}")
    raise AttributeError(f"module 'jaxbn' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_SUBMODULES])
