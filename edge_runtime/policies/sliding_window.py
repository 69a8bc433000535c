"""Sliding window with attention sinks (StreamingLLM, Xiao et al. 2023, https://arxiv.org/abs/2309.17453)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from edge_runtime.policies.base import Policy, same_for_every_head

if TYPE_CHECKING:
    from edge_runtime._native import KVPass
    from edge_runtime.memory import VideoMemory


class SlidingWindow(Policy):
    """Keep the first `sink_tokens` video tokens (the attention sinks) and the most recent ones."""

    name = "sliding-window"

    def __init__(self, sink_tokens: int = 4) -> None:  # 4: StreamingLLM's default
        self.sink_tokens = sink_tokens

    def select(self, memory: VideoMemory, kv: KVPass, keep: int) -> np.ndarray:
        n = memory.video_tokens
        sinks = min(self.sink_tokens, keep)
        slots = np.concatenate([np.arange(sinks), np.arange(n - (keep - sinks), n)])
        return same_for_every_head(memory, slots)
