"""Test-session setup: float64 is enabled so that gradient checks can run in double precision.

Every test states its dtypes explicitly, so float32/bfloat16 behaviour is tested as well.
"""

import jax

jax.config.update("jax_enable_x64", True)
