"""The interface every memory policy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.session import VideoMemory


class MemoryFull(Exception):
    """The video memory cannot take the next frame; str() is one line that says what to do."""


class Policy(ABC):
    name: str

    @abstractmethod
    def make_room(self, memory: VideoMemory, n_incoming: int) -> None:
        """Ensure `n_incoming` more video tokens fit in `memory`, or raise MemoryFull."""
