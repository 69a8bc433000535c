"""Full cache: keep every token, as plain llama.cpp does. The baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass

from edge_runtime.policies.base import Policy


@dataclass
class FullCache(Policy):
    """No cap: memory grows with the stream until the context is full, then the stream stops."""

    name = "full"
    compresses = False
