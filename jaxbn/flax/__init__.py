"""Drop-in Flax layers backed by jaxbn: :mod:`jaxbn.flax.nnx` and :mod:`jaxbn.flax.linen`.

Install with ``pip install 'jaxbn[flax]'``. ``import jaxbn`` never imports Flax.
"""

from jaxbn._adapter import require

require("flax", "flax")
