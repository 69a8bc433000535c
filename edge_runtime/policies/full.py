"""Full cache: keep every token, as plain llama.cpp does. The baseline every method is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy

if TYPE_CHECKING:
    from edge_runtime._native import KVPass
    from edge_runtime.memory import VideoMemory


class FullCache(Policy):
    """No cap: memory grows with the stream until the context is full, then the stream stops."""

    name = "full"
    compresses = False

    def select(self, memory: VideoMemory, kv: KVPass, keep: int) -> np.ndarray:
        raise NotImplementedError("the full cache never compresses")
