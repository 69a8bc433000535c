"""Uniform frame sampling: the query-agnostic baseline of the InfiniPot-V paper (https://arxiv.org/abs/2506.15745)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy

if TYPE_CHECKING:
    from edge_runtime.memory import VideoMemory


@dataclass
class Uniform(Policy):
    """Keep |C| / p whole frames, evenly spaced over the frames in memory (first and last included)."""

    name = "uniform"
    paper = "https://arxiv.org/abs/2506.15745"

    def scores(self, memory: VideoMemory, keep: int) -> np.ndarray:
        frame = memory.slots.frame[0, 0, :memory.video_tokens]  # whole frames: every head holds the same
        frames = np.unique(frame)
        n = keep // memory.tokens_per_frame
        chosen = frames[np.round(np.linspace(0, len(frames) - 1, n)).astype(int)]
        return np.isin(frame, chosen).astype(np.float64)
