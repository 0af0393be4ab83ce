"""Test-session setup: float64 is enabled so that gradient checks can run in double precision.

Every test states its dtypes explicitly, so float32/bfloat16 behaviour is tested as well.
"""

import jax

jax.config.update("jax_enable_x64", True)

# The *_check.py scripts run in subprocesses with their own device counts (see their
# docstrings). --doctest-modules would import them here, which runs them in the test process and
# leaves it with their 8 simulated devices (or, without arguments, fails).
collect_ignore_glob = ["*_check.py"]
