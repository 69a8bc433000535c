"""The interface every memory policy implements, and the helpers the whole-frame baselines share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edge_runtime._native import KVPass
    from edge_runtime.memory import VideoMemory


class MemoryFull(Exception):
    """The video memory cannot take the next frame; str() is one line that says what to do."""


class SettingsError(ValueError):
    """Compression settings that cannot work; str() is one line that says what to do."""


class Policy(ABC):
    """Decides which |C| tokens each (layer, KV head) keeps when the video memory reaches its budget |M|."""

    name: str
    compresses = True  # False: the memory only grows (the full cache)
    # True: select() returns the native selection itself, so the pass may move each layer as it chooses it.
    native_choice_is_final = True

    def check(self, memory: VideoMemory, keep: int) -> None:  # noqa: B027 - optional hook
        """Raise SettingsError if this policy cannot compress `memory` to `keep` tokens."""

    @abstractmethod
    def select(self, memory: VideoMemory, kv: KVPass, keep: int) -> np.ndarray:
        """Kept slot indices, int32 [n_layer, n_head_kv, keep], ascending per (layer, head).

        `kv` holds the state just read (keys, values, positions); `memory.slots` says what each slot holds.
        """


def same_for_every_head(memory: VideoMemory, slots: np.ndarray) -> np.ndarray:
    """Baselines that choose frames or tokens, not per head: the same slots for every (layer, head)."""
    n_layer, n_head = memory.slots.frame.shape[:2]
    return np.ascontiguousarray(np.broadcast_to(np.sort(slots).astype(np.int32), (n_layer, n_head, len(slots))))


def recent_frames(memory: VideoMemory, recent_fraction: float) -> int:
    """Index of the oldest of the r most recent frames, r = recent_fraction x the frames the budget holds.

    r is capped by the frames that arrived since the last pass: only those are whole in every head.
    """
    r = max(1, round(recent_fraction * memory.budget / memory.tokens_per_frame))
    r = min(r, memory.frames_since_pass)
    return memory.records[-r].index
