"""Uniform frame sampling: the query-agnostic baseline of the InfiniPot-V paper (https://arxiv.org/abs/2506.15745)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy, same_for_every_head

if TYPE_CHECKING:
    from edge_runtime._native import KVPass
    from edge_runtime.memory import VideoMemory


class Uniform(Policy):
    """Keep |C| / p whole frames, evenly spaced over the frames in memory (first and last included)."""

    name = "uniform"

    def select(self, memory: VideoMemory, kv: KVPass, keep: int) -> np.ndarray:
        frame = memory.slots.frame[0, 0, :memory.video_tokens]  # whole frames: every head holds the same
        frames = np.unique(frame)
        chosen = frames[np.round(np.linspace(0, len(frames) - 1, keep // memory.tokens_per_frame)).astype(int)]
        return same_for_every_head(memory, np.flatnonzero(np.isin(frame, chosen)))
