"""Timing by interleaved repetitions: each round runs every candidate once, in turn, so that
drifts of a shared, noisy machine hit all of them alike; the median over rounds is reported."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax


def _block(out: Any) -> None:
    jax.block_until_ready(out)


def interleaved_medians(fns: dict[str, Callable[[], Any]], *, repeats: int = 20,
                        warmup: int = 2, min_seconds: float = 0.0) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, measured in interleaved rounds."""
    times = interleaved_times(fns, repeats=repeats, warmup=warmup, min_seconds=min_seconds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_times(fns: dict[str, Callable[[], Any]], *, repeats: int = 20,
                      warmup: int = 2, min_seconds: float = 0.0) -> dict[str, list[float]]:
    """Seconds of every call of each zero-argument function, measured in interleaved rounds.

    Warm-up calls (compilation) are excluded. Rounds continue past ``repeats`` until at least
    ``min_seconds`` of measurement have passed.
    """
    for _ in range(warmup):
        for fn in fns.values():
            _block(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_seconds:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


# PyTorch's OpenMP runtime (libgomp) keeps each worker spinning for GOMP_SPINCOUNT=300000
# iterations after a parallel region: 10-30 ms on the 2-core reference machine, so in an
# interleaved round it spins on a core through the next candidates' calls (jaxbn's two-thread
# bfloat16 forward right after PyTorch's took 1.38 ms against 1.01 ms back to back). 30000 keeps
# the workers spinning between the parallel regions of one PyTorch call but not into the next
# library's (PyTorch's own forward alone: 0.81 ms against 0.85 ms with the default).
TORCH_SPINCOUNT = "30000"


def calm_openmp(default_spin: bool = False) -> str:
    """Sets ``GOMP_SPINCOUNT`` for PyTorch's OpenMP workers before PyTorch is imported; returns
    what its workers do, for the results. An ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` already in
    the environment is kept, and so is PyTorch's default with ``default_spin``."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in os.environ:
            return f"{name}={os.environ[name]} (from the environment)"
    if default_spin:
        return "PyTorch's default (GOMP_SPINCOUNT=300000)"
    if "torch" in sys.modules:  # libgomp read its environment when PyTorch was imported
        return "PyTorch's default (it was imported before the benchmark)"
    os.environ["GOMP_SPINCOUNT"] = TORCH_SPINCOUNT
    return f"GOMP_SPINCOUNT={TORCH_SPINCOUNT}"


@contextlib.contextmanager
def native_kernels(enabled: bool):
    """Traces (and compiles) inside run with jaxbn's native CPU kernels on or off: the switch
    ``JAXBN_NATIVE`` is read when a function is traced, so compile inside the block."""
    old = os.environ.get("JAXBN_NATIVE")
    os.environ["JAXBN_NATIVE"] = "1" if enabled else "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAXBN_NATIVE")
        else:
            os.environ["JAXBN_NATIVE"] = old
