"""Memory policies: what the session does when the next frame does not fit in the video memory.

A policy sees the session's `VideoMemory` (the token records and the budget) before each frame and may
make room for it. Baselines and compression methods share this one interface, so benchmarks loop over
`POLICIES`.
"""

from __future__ import annotations

from edge_runtime.policies.base import MemoryFull, Policy
from edge_runtime.policies.full import FullCache

POLICIES: dict[str, type[Policy]] = {"full": FullCache}

__all__ = ["POLICIES", "FullCache", "MemoryFull", "Policy"]
