"""Test helpers that look at the KV cache through the model's own eyes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from edge_runtime.context import Context


def probe_logits(context: Context, pos: int) -> np.ndarray:
    """Next-token logits of one probe token decoded on top of the memory at `pos`, then removed again."""
    token = context.model.tokenize(" the")[0]
    partial = context.partial_state()  # a sliding window or a recurrent state cannot be cut back by positions
    context.decode_tokens([token], pos)
    logits = context.logits()
    if partial is not None:
        context.restore_partial_state(partial)
    context.remove_positions(pos)
    return logits


def moved_keys(kv, seen: dict, layer: int, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """After a pass: the layer's first `keep` keys [H, keep, D], and the keys its kept slots held before
    (`seen` as a recording policy saved them). Values must have moved byte for byte; keys are the caller's
    to compare (unchanged in keep mode, re-rotated in reindex mode)."""
    kept = seen["kept"][layer]
    old_values = np.take_along_axis(seen["values"][layer], kept[..., None], axis=1)
    np.testing.assert_array_equal(kv.values(layer)[:, :keep], old_values)
    return kv.keys(layer)[:, :keep], np.take_along_axis(seen["keys"][layer], kept[..., None], axis=1)


def after_each_pass(session, frames: Iterable) -> Iterator[dict]:
    """Insert frames; after each one that set off a compression pass, yield what the checker saw in that pass."""
    for frame in frames:
        passes = session.memory.passes
        session.insert_frame(frame)
        if session.memory.passes != passes:
            yield session.policy.seen[-1]


def everything_kept(kv, session, reindex: bool) -> None:
    """A pass that keeps every slot where it is: cells at the positions they hold (a portable read first)."""
    kv.read()
    n = kv.n_slots
    geo = session.geometry
    everything = np.ascontiguousarray(np.broadcast_to(np.arange(n, dtype=np.int32), (geo.n_layer, geo.n_head_kv, n)))
    frame, patch, rot_pos = session.memory.slots.pass_tables()
    kv.compress(frame, patch, rot_pos, n, everything, reindex, session.memory.next_pos, new_pos=kv.slot_positions())
