"""Random eviction: each (layer, head) keeps |C| tokens drawn uniformly. The floor any method must beat."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy

if TYPE_CHECKING:
    from edge_runtime.memory import VideoMemory


@dataclass
class RandomTokens(Policy):
    """Keep a uniformly random |C| of the slots, independently per (layer, head); reproducible from `seed`."""

    name = "random"
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def scores(self, memory: VideoMemory, keep: int) -> np.ndarray:
        n_layer, n_head = memory.slots.frame.shape[:2]
        return -self.rng.random((n_layer, n_head, memory.video_tokens))
