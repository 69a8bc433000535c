"""The video memory's bookkeeping: which frame, patch and rotation each KV slot of each head holds.

Before the first compression every (layer, KV head) holds the same tokens, one per KV cell. A pass lets
each head keep its own |C| tokens, so afterwards cell j of head h holds the j-th kept token of head h:
cells become slots, and what a slot holds is recorded here per (layer, head). Slots are always in time
order (a pass keeps them sorted, new frames come after), which the native pass relies on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime import _native


@dataclass(frozen=True)
class FrameRecord:
    """One ingested frame: where it went in the KV cache when it was decoded."""

    index: int
    timestamp: float
    pos0: int
    n_tokens: int  # cells (tokens) the frame took
    n_pos: int  # positions it spans; fewer than n_tokens on M-RoPE models
    nx: int  # patch grid of its image tokens
    ny: int
    wrapper_tokens: int = 0  # text tokens mtmd puts around the image (Gemma 3: <start_of_image>, <end_of_image>)


class SlotTable:
    """Per (layer, head, slot): frame index, patch index (y * nx + x) and the position its key is rotated at.

    Each table is [n_layer, n_head_kv, capacity]; the first n slots of every (layer, head) are live. A pass
    reads and rewrites them in place, in native code (~10^5 entries a table on a real model).
    """

    def __init__(self, n_layer: int, n_head_kv: int, capacity: int) -> None:
        shape = (n_layer, n_head_kv, capacity)
        self.frame = np.zeros(shape, np.int32)
        self.patch = np.zeros(shape, np.int32)
        self.rot_pos = np.zeros(shape, np.int32)
        self.n = 0

    def append(self, frame_index: int, n_tokens: int, pos0: int, one_position: bool = False) -> None:
        """A new frame's tokens at positions pos0.. (one_position: all at pos0, as M-RoPE frames are)."""
        end = self.n + n_tokens
        if end > self.frame.shape[2]:
            raise ValueError(f"slot table full ({self.frame.shape[2]} slots)")
        self.frame[:, :, self.n:end] = frame_index
        self.patch[:, :, self.n:end] = np.arange(n_tokens, dtype=np.int32)
        # M-RoPE: the t, y and x sections all start at pos0 (y, x add the row and column): pos0 is the one
        # rotation the pass undoes or changes; the row and column stay in the key, the same in every frame.
        self.rot_pos[:, :, self.n:end] = pos0 if one_position else np.arange(pos0, pos0 + n_tokens, dtype=np.int32)
        self.n = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Contiguous [L, H, n] copies (never views: a pass rewrites the tables while callers hold these)."""
        n = self.n
        return tuple(np.array(t[:, :, :n], order="C", copy=True) for t in (self.frame, self.patch, self.rot_pos))

    def pass_tables(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The three tables themselves, [L, H, capacity], for the native pass to read the first n slots of.

        Not copies: keep() rewrites them.
        """
        return self.frame, self.patch, self.rot_pos

    def keep(self, kept: np.ndarray, new_rot_pos: np.ndarray | None) -> np.ndarray:
        """Slot j of head (l, h) becomes the old slot kept[l, h, j]; keys re-rotated to new_rot_pos if given.

        Returns the frame indices with at least one token left in some head, ascending.
        """
        present = _native.keep_slots(self.frame, self.patch, self.rot_pos, self.n, kept, new_rot_pos)
        self.n = kept.shape[2]
        return present


@dataclass
class VideoMemory:
    """The frames in memory and what each slot holds: what a policy sees, kept consistent by two calls only.

    `append` records a frame just decoded; `apply_pass` records what a compression pass kept. Nothing else
    writes these fields.
    """

    capacity: int  # video tokens the context can hold: context minus the opening and the question room
    budget: int  # |M|: video tokens that trigger a compression pass (= capacity for the full cache)
    prefix_tokens: int
    next_pos: int  # where the next frame (or a question) starts
    slots: SlotTable
    mrope: bool = False  # M-RoPE: a frame's tokens share one position, and span max(nx, ny) positions
    records: list[FrameRecord] = field(default_factory=list)
    frames_since_pass: int = 0  # trailing frames no pass has touched: whole in every head
    passes: int = 0

    @property
    def video_tokens(self) -> int:
        return self.slots.n

    @property
    def grid(self) -> tuple[int, int]:
        """The grid the policies score a frame's tokens on. A frame wrapped in text tokens is scored as one row
        of all its tokens: a wrapper token is compared with the same wrapper in the recent frames, as a patch is."""
        if not self.records:
            return (0, 0)
        last = self.records[-1]
        return (last.n_tokens, 1) if last.wrapper_tokens else (last.nx, last.ny)

    @property
    def tokens_per_frame(self) -> int:
        return self.records[-1].n_tokens if self.records else 0

    def append(self, record: FrameRecord) -> None:
        """A frame was decoded at record.pos0: its tokens take the next slots of every head."""
        self.slots.append(record.index, record.n_tokens, record.pos0, one_position=self.mrope)
        self.records.append(record)
        self.next_pos += record.n_pos
        self.frames_since_pass += 1

    def apply_pass(self, kept: np.ndarray, new_pos: np.ndarray, reindex: bool) -> None:
        """A pass kept, per (layer, head), the slots `kept` [L, H, C] (ascending), cell j at position new_pos[j]."""
        present = set(self.slots.keep(kept, new_pos if reindex else None).tolist())
        if reindex:
            # M-RoPE: the last slot's row and column reach max(nx, ny) - 1 past its position; text and new
            # frames must start above every position a key holds.
            keep = kept.shape[2]
            self.next_pos = self.prefix_tokens + keep + (self.records[-1].n_pos - 1 if self.mrope else 0)
        self.records = [r for r in self.records if r.index in present]
        self.frames_since_pass = 0
        self.passes += 1

    def load(self, *, next_pos: int, passes: int, frames_since_pass: int, records: list[FrameRecord],
             frame: np.ndarray, patch: np.ndarray, rot_pos: np.ndarray) -> None:
        """Put back a memory saved by edge_runtime/checkpoint.py into this fresh one (same capacity, budget,
        prefix and heads): the first n slots of each table [L, H, n], the records and the counters.

        Checked before anything changes (ValueError, one line): the shapes, the records against the tables
        (every frame a slot holds has a record, in time order) and the positions against next_pos.
        """
        if self.records or self.slots.n or self.passes:
            raise ValueError("a memory can only be loaded into a fresh one (nothing ingested yet)")
        shape = self.slots.frame.shape
        n = frame.shape[2] if frame.ndim == 3 else -1
        if any(t.shape != (shape[0], shape[1], n) for t in (frame, patch, rot_pos)) or not 0 <= n <= shape[2]:
            raise ValueError(f"slot tables of shape {frame.shape} do not fit [{shape[0]}, {shape[1]}, <= {shape[2]}]")
        indices = [r.index for r in records]
        if indices != sorted(set(indices)) or not 0 <= frames_since_pass <= len(records) or passes < 0:
            raise ValueError("the frame records are not in time order or the counters do not match them")
        if sum(r.n_tokens for r in records[len(records) - frames_since_pass:]) > n:
            raise ValueError("the frames since the last pass hold more tokens than the slot tables")
        if n and not set(np.unique(frame).tolist()) <= set(indices):
            raise ValueError("the slot tables hold frames that have no record")
        if n and (int(rot_pos.max()) >= next_pos or int(rot_pos.min()) < self.prefix_tokens):
            raise ValueError(f"the slots' positions do not lie in [{self.prefix_tokens}, {next_pos})")
        for mine, theirs in zip(self.slots.pass_tables(), (frame, patch, rot_pos), strict=True):
            mine[:, :, :n] = theirs
        self.slots.n = n
        self.records = list(records)
        self.next_pos, self.passes, self.frames_since_pass = next_pos, passes, frames_since_pass
