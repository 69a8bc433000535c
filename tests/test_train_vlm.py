"""The training data of edge-vlm (scripts/train_vlm.py): what a clip's attention weights stand for."""

from __future__ import annotations

import numpy as np
from conftest import load_script

from edge_runtime.scenes import make_stream

TOKENS = {"prefix": [1, 2, 3], "first": {}, "later": {}, "answer": {}}  # no questions: the frames are the point


def test_a_pruned_clip_weighs_down_only_the_older_background_patches() -> None:
    tv = load_script("train_vlm")
    checked_objects = 0
    for seed in range(20):
        x = tv.make_example(seed, 12, 3, TOKENS, 36, sparse=True, pruned=True)
        weights = np.array(x["key_weight"][3:3 + 12 * 36]).reshape(12, 36)
        stream = make_stream(seed, 12, n_events=tv.SPARSE_EVENTS, duration=tv.SPARSE_DURATION)
        w = weights.min()
        assert tv.PRUNED_WEIGHT <= w < 1
        for t in range(12):
            expected = np.ones(36)
            if t < 12 - tv.RECENT_WHOLE:  # the newest frames stay whole, as InfiniPot-V's recent frames do
                expected[:] = w
                expected[stream.object_patches(t, 6, 6)] = 1.0
                checked_objects += stream.object_patches(t, 6, 6).size
            np.testing.assert_array_equal(weights[t], expected)
    assert checked_objects > 0
    whole = tv.make_example(3, 12, 3, TOKENS, 36, sparse=True)
    assert set(whole["key_weight"]) == {1.0}
