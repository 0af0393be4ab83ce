"""Drop-in Flax layers backed by jaxbn: :mod:`jaxbn.flax.nnx` and :mod:`jaxbn.flax.linen`.

Install with ``pip install 'jaxbn[flax]'``. ``import jaxbn`` never imports Flax; ``jaxbn.flax.nnx``
and ``jaxbn.flax.linen`` are imported when first used.
"""

import importlib as _importlib

from jaxbn._adapter import require

require("flax", "flax")


def __getattr__(name: str):
    if name in ("nnx", "linen"):
        return _importlib.import_module(f"jaxbn.flax.{name}")
    raise AttributeError(f"module 'jaxbn.flax' has no attribute {name!r}")
