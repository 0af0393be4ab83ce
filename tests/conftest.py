"""Test-session setup: float64 is enabled so that gradient checks can run in double precision.

Every test states its dtypes explicitly, so float32/bfloat16 behaviour is tested as well.
"""

import os

# Compilation, not execution, is most of this suite's time. The test command compiles with LLVM's
# cheap pipeline: the HLO XLA runs (what is computed, in which order) is the same, the machine code
# less optimized. JAXBN_TEST_FULL_OPT=1 keeps XLA's defaults (.ci/run's floor job runs the whole
# suite that way). Subprocesses started by tests inherit the setting through the environment.
# The fusions' code comes from XLA's elemental IR emitters, not its newer MLIR fusion emitters:
# on this suite's small programs they take about 2.5 times as long to compile (the test command
# took 5 min 29 s with them on 2 cores, 3 min 26 s without). Each program's code is generated
# in one piece, not split for parallel code generation: the two workers already keep both cores
# busy (tests/test_layer_norm.py alone: 44-48 s that way, 54-56 s split, on a 2-core AMD EPYC).
if not os.environ.get("JAXBN_TEST_FULL_OPT"):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [
        os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true", "--xla_cpu_use_fusion_emitters=false",
        "--xla_cpu_parallel_codegen_split_count=1"]))

# One compilation per distinct program in the whole run: the two xdist workers and the
# subprocesses tests start share a persistent cache in a directory of this run alone (the
# controller creates it; the workers and subprocesses inherit it through the environment).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and not os.environ.get("JAXBN_TEST_NO_CACHE"):
    import atexit
    import shutil
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxbn-test-xla-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_enable_x64", True)

# The *_check.py scripts run in subprocesses with their own device counts (see their
# docstrings). --doctest-modules would import them here, which runs them in the test process and
# leaves it with their 8 simulated devices (or, without arguments, fails).
collect_ignore_glob = ["*_check.py"]
