"""The training data of edge-vlm (scripts/train_vlm.py): what a clip's attention weights stand for."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import load_script
from reference_infinipot_v import select_tokens

from edge_runtime.policies import InfiniPotV
from edge_runtime.scenes import make_stream
from edge_runtime.session import SessionConfig

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


def test_a_compressed_stream_has_the_runtimes_memory_when_asked() -> None:
    tv = load_script("train_vlm")
    session, policy = SessionConfig(), InfiniPotV()
    assert (tv.KEEP_FRACTION, tv.RECENT_FRACTION, tv.COMPRESSED_ALPHA) == (
        session.keep_fraction, policy.recent_fraction, policy.alpha)
    assert tv.memory_geometry(120, 1 / 8) == (15, 11, 2)  # |M| 15 frames, |C| 11, r 2: the benchmark's 1/8
    for after in range(4):
        x = tv.make_example(after, 120, 8, TOKENS, 36, compressed=(1 / 8, after))
        assert x["compress"] == (120 - after, 11 * 36, 2)
        assert set(x["key_weight"]) == {1.0}
    with pytest.raises(ValueError, match="passes every 4"):
        tv.make_example(0, 120, 8, TOKENS, 36, compressed=(1 / 8, 4))  # a pass would have come first
    assert tv.make_example(0, 12, 3, TOKENS, 36)["compress"] is None


def test_the_training_time_pass_drops_what_the_reference_infinipot_v_drops() -> None:
    torch = pytest.importorskip("torch")
    tv = load_script("train_vlm")
    first, P, L, H, D, T = 3, 9, 2, 2, 8, 3 + 6 * 9  # the prompt, then 6 frames of a 3x3 grid
    g = torch.Generator().manual_seed(0)
    record = [(torch.randn(2, H, T, D, generator=g), None, torch.randn(2, H, T, D, generator=g)) for _ in range(L)]
    compress = [(5, 20, 1), (6, 40, 2)]  # example 0 is compressed before its last frame, 1 after it
    dropped = tv.infinipot_v_dropped(record, first, P, compress)
    assert not dropped[:, :, :, :first].any()  # the prompt stays
    for b, (n, keep, r) in enumerate(compress):
        keys = torch.stack([k[b] for k, _, _ in record])[:, :, first:first + n * P].double().numpy()
        values = torch.stack([v[b] for _, _, v in record])[:, :, first:first + n * P].double().numpy()
        frame = np.broadcast_to(np.repeat(np.arange(n), P), (L, H, n * P))
        patch = np.broadcast_to(np.tile(np.arange(P), n), (L, H, n * P))
        expected = select_tokens(keys, values, frame, patch, (3, 3), list(range(n - r, n)), keep,
                                 alpha=tv.COMPRESSED_ALPHA)
        for layer in range(L):
            for head in range(H):
                kept = set(range(n * P)) - set((dropped[b, layer, head].nonzero().flatten() - first).tolist())
                assert sorted(kept) == expected[layer, head].tolist()
        assert not dropped[b, :, :, first + (n - r) * P:].any()  # the recent frames and what came after stay
