"""Full cache: keep every token, as plain llama.cpp does. The baseline every method is measured against."""

from __future__ import annotations

from typing import TYPE_CHECKING

from edge_runtime.policies.base import MemoryFull, Policy

if TYPE_CHECKING:
    from edge_runtime.session import VideoMemory


class FullCache(Policy):
    """No cap: memory grows with the stream until the context is full, then the stream stops."""

    name = "full"

    def make_room(self, memory: VideoMemory, n_incoming: int) -> None:
        if memory.video_tokens + n_incoming > memory.capacity:
            raise MemoryFull(
                f"video memory full after {len(memory.records)} frames ({memory.video_tokens} tokens of "
                f"{memory.capacity}); allocate more with --ctx or cap it with a compression policy"
            )
