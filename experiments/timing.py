"""Timing by interleaved repetitions: each round runs every candidate once, in turn, so that
drifts of a shared, noisy machine hit all of them alike; the median over rounds is reported."""

from __future__ import annotations

import contextlib
import os
import statistics
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
