"""The tests' wall-clock limits, scaled for a slow machine.

A limit here only stops a test that hangs; it never measures speed (benchmarks do, as ratios). Under
emulation (scripts/arm64_suite.sh runs the suite under qemu-user, 10x to 50x slower) the same limits would
fail tests that are merely slow, so EDGE_TEST_TIME_SCALE multiplies every one of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable


def scale() -> float:
    """EDGE_TEST_TIME_SCALE, checked (conftest.py turns a bad one into pytest's one-line usage error)."""
    raw = os.environ.get("EDGE_TEST_TIME_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value >= 1:
        raise ValueError(f"EDGE_TEST_TIME_SCALE={raw!r}: give a number >= 1 (how many times slower this machine is)")
    return value


def wall_s(seconds: float) -> float:
    """A wall-clock limit of `seconds` on a fast machine, as long as it must be on this one."""
    return seconds * scale()


def wait_until(predicate: Callable[[], object], limit_s: float = 60.0, what: str = "", poll_s: float = 0.05) -> None:
    """Polls `predicate` until it is true; fails the test if it is not within `limit_s` (scaled)."""
    deadline = time.monotonic() + wall_s(limit_s)
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {limit_s:g} s (x{scale():g}): {what or 'the condition'}")
        time.sleep(poll_s)
