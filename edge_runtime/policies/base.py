"""The interface every memory policy implements (kvpress's presses are the model).

A policy is a small dataclass whose fields are its settings. It looks only at the memory's bookkeeping
(which frame and patch each slot of each (layer, KV head) holds) and says what a pass keeps, in one of two
ways: `scores` for the baselines (the base class owns the top-k: the |C| highest per (layer, head), ties to
the older slot), or native scoring settings (InfiniPot-V: its scores need the keys and values, which only
the native pass reads). The compressor (edge_runtime/compressor.py) carries the choice out.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from edge_runtime.errors import MemoryFull, SettingsError  # noqa: F401 - re-exported by edge_runtime.policies

if TYPE_CHECKING:
    from edge_runtime._native import ScoreParams
    from edge_runtime.memory import VideoMemory


@dataclass
class Policy(ABC):
    """Decides which |C| tokens each (layer, KV head) keeps when the video memory reaches its budget |M|."""

    name: ClassVar[str]
    paper: ClassVar[str] = ""
    compresses: ClassVar[bool] = True  # False: the memory only grows (the full cache)
    # Benchmark specs (policy_from_spec) may name a field by a shorter word: {"recent": "recent_fraction"}.
    aliases: ClassVar[dict[str, str]] = {}

    def check(self, memory: VideoMemory, keep: int) -> None:  # noqa: B027 - optional hook
        """Raise SettingsError if this policy cannot compress `memory` to `keep` tokens."""

    def scores(self, memory: VideoMemory, keep: int) -> np.ndarray:
        """Per slot, how much it is worth keeping: [n_slots] (the same for every head) or [L, H, n_slots]."""
        raise NotImplementedError(f"{self.name} writes no scores")

    def choose(self, memory: VideoMemory, keep: int) -> np.ndarray | ScoreParams:
        """What the pass keeps: kept slots [L, H, keep], ascending per (layer, head), or native settings."""
        n_layer, n_head = memory.slots.frame.shape[:2]
        scores = np.broadcast_to(self.scores(memory, keep), (n_layer, n_head, memory.video_tokens))
        best = np.argsort(-scores, axis=2, kind="stable")[:, :, :keep]  # stable: ties go to the older slot
        return np.ascontiguousarray(np.sort(best, axis=2), dtype=np.int32)


def recent_frames(memory: VideoMemory, recent_fraction: float) -> int:
    """Index of the oldest of the r most recent frames, r = recent_fraction x the frames the budget holds.

    r is capped by the frames that arrived since the last pass: only those are whole in every head.
    """
    r = max(1, round(recent_fraction * memory.budget / memory.tokens_per_frame))
    r = min(r, memory.frames_since_pass)
    return memory.records[-r].index
