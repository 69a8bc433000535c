"""Sliding window with attention sinks (StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy

if TYPE_CHECKING:
    from edge_runtime.memory import VideoMemory


@dataclass
class SlidingWindow(Policy):
    """Keep the first `sink_tokens` video tokens (the attention sinks) and the most recent ones."""

    name = "sliding-window"
    paper = "https://arxiv.org/abs/2309.17453"
    sink_tokens: int = 4  # StreamingLLM's default

    def scores(self, memory: VideoMemory, keep: int) -> np.ndarray:
        newer = np.arange(memory.video_tokens, dtype=np.float64)  # newest first
        newer[:self.sink_tokens] = np.inf
        return newer
