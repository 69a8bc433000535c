"""Random eviction: each (layer, head) keeps |C| tokens drawn uniformly. The floor any method must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy

if TYPE_CHECKING:
    from edge_runtime._native import KVPass
    from edge_runtime.memory import VideoMemory


class RandomTokens(Policy):
    """Keep a uniformly random |C| of the slots, independently per (layer, head); reproducible from `seed`."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def select(self, memory: VideoMemory, kv: KVPass, keep: int) -> np.ndarray:
        n_layer, n_head = memory.slots.frame.shape[:2]
        scores = self.rng.random((n_layer, n_head, memory.video_tokens))
        kept = np.argpartition(scores, keep - 1, axis=2)[:, :, :keep]
        return np.ascontiguousarray(np.sort(kept, axis=2).astype(np.int32))
