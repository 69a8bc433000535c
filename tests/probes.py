"""Test helpers that look at the KV cache through the model's own eyes."""

from __future__ import annotations

import numpy as np

from edge_runtime.model import VisionLanguageModel


def probe_logits(model: VisionLanguageModel, pos: int) -> np.ndarray:
    """Next-token logits of one probe token decoded on top of the memory at `pos`, then removed again."""
    token = model.tokenize(" the")[0]
    partial = model.partial_state()  # a sliding window or a recurrent state cannot be cut back by positions
    model.decode_tokens([token], pos)
    logits = model.logits()
    if partial is not None:
        model.restore_partial_state(partial)
    model.remove_positions(pos)
    return logits
