"""The training data of edge-vlm (scripts/train_vlm.py): what a clip's attention weights stand for."""

from __future__ import annotations

import numpy as np
import pytest
from reference_infinipot_v import select_tokens

from edge_runtime.policies import InfiniPotV
from edge_runtime.scenes import make_stream
from edge_runtime.session import SessionConfig
from scripts import train_vlm as tv
from scripts import vlm_text
from scripts.scene_tools import object_patches

TOKENS = {"prefix": [1, 2, 3], "first": {}, "later": {}, "answer": {}}  # no questions: the frames are the point


def test_object_patches_are_the_cells_its_colour_is_in() -> None:
    """The patch mask (what retention counts as evidence) matches the pixels: background channels stay within
    ~30 of each other plus noise, the coloured objects' differ by over 100."""
    checked = 0
    for seed in range(6):
        stream = make_stream(seed, 60)
        for t in range(stream.n_frames):
            event = stream.event_at(t)
            if event is None:
                assert object_patches(stream, t, 6, 6).size == 0
                continue
            if event.obj.colour == "white" or event.obj.kind == "card":  # grey-ish, or ink of any colour
                continue
            frame = stream.frame(t).astype(int)
            coloured = (frame.max(axis=2) - frame.min(axis=2)) > 100
            cells = np.flatnonzero(coloured.reshape(6, 16, 6, 16).any(axis=(1, 3)))
            np.testing.assert_array_equal(object_patches(stream, t, 6, 6), cells)
            checked += 1
    assert checked > 20


def test_a_pruned_clip_weighs_down_only_the_older_background_patches() -> None:
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
                expected[object_patches(stream, t, 6, 6)] = 1.0
                checked_objects += object_patches(stream, t, 6, 6).size
            np.testing.assert_array_equal(weights[t], expected)
    assert checked_objects > 0
    whole = tv.make_example(3, 12, 3, TOKENS, 36, sparse=True)
    assert set(whole["key_weight"]) == {1.0}


def test_a_compressed_stream_has_the_runtimes_memory() -> None:
    session, policy = SessionConfig(), InfiniPotV()
    assert (tv.KEEP_FRACTION, tv.RECENT_FRACTION, tv.COMPRESSED_ALPHA) == (
        session.keep_fraction, policy.recent_fraction, policy.alpha)
    assert tv.memory_geometry(15) == (11, 2)  # |M| 15 frames (1/8 of 120): |C| 11 frames, r 2, a pass every 4
    assert tv.memory_geometry(tv.COMPRESSED_MIN_FRAMES) == (6, 1)
    x = tv.make_example(0, 60, 8, TOKENS, 36, compressed=12)
    assert x["compress"] == 12 and set(x["key_weight"]) == {1.0}
    with pytest.raises(ValueError, match="a memory of 60 frames"):
        tv.make_example(0, 60, 8, TOKENS, 36, compressed=60)
    assert tv.make_example(0, 12, 3, TOKENS, 36)["compress"] == 0


def test_the_training_time_pass_keeps_what_the_reference_infinipot_v_keeps() -> None:
    """Two passes in a row: the second over memories that differ per (layer, KV head), as in a stream."""
    torch = pytest.importorskip("torch")
    first, P, B, L, H, D = 3, 9, 2, 2, 2, 8  # a 3-token prompt, frames of a 3x3 grid
    g = torch.Generator().manual_seed(0)
    keys, values = (torch.randn(B, L, H, first + 9 * P, D, generator=g) for _ in range(2))
    held = torch.arange(first + 6 * P).expand(B, L, H, -1)  # 6 frames in memory: the first pass keeps 4 frames' worth
    passes = [(held, 1, 4 * P)]
    after_first = tv.infinipot_v_pass(keys, values, held, first, P, 1, 4 * P)
    # 3 more frames arrive (tokens first + 6P ...), then a second pass with r = 2
    held2 = torch.cat([after_first, torch.arange(first + 6 * P, first + 9 * P).expand(B, L, H, -1)], -1)
    passes.append((held2, 2, 5 * P))
    after_second = tv.infinipot_v_pass(keys, values, held2, first, P, 2, 5 * P)
    for (before, r, keep), after in zip(passes, (after_first, after_second), strict=True):
        assert after.shape[-1] == first + keep and (after[..., :first] == torch.arange(first)).all()
        for b in range(B):
            video = before[b, :, :, first:]  # [L, H, N]: the tokens each head held
            tok = video.numpy()
            kv = [np.take_along_axis(t[b].double().numpy(), tok[..., None], 2) for t in (keys, values)]
            frame, patch = (tok - first) // P, (tok - first) % P
            recent = sorted(set(frame[0, 0, -r * P:].tolist()))
            slots = select_tokens(kv[0], kv[1], frame, patch, (3, 3), recent, keep, alpha=tv.COMPRESSED_ALPHA)
            expected = np.take_along_axis(tok, slots, 2)
            np.testing.assert_array_equal(after[b, :, :, first:].numpy(), expected)
    assert not (after_second[0, 0] == after_second[0, 1]).all()  # the heads keep different tokens


def test_a_stream_under_a_budget_it_never_fills_is_the_plain_forward() -> None:
    torch = pytest.importorskip("torch")
    hp = {"n_layer": 2, "n_embd": 32, "n_ff": 48, "n_head": 4, "n_head_kv": 2, "rope_base": 10000.0, "n_rot": 8,
          "eps": 1e-5}
    g = torch.Generator().manual_seed(0)
    kv = 16
    shapes = {"attn_q": (32, 32), "attn_k": (kv, 32), "attn_v": (kv, 32), "attn_output": (32, 32),
              "ffn_gate": (48, 32), "ffn_up": (48, 32), "ffn_down": (32, 48)}
    weights = {f"blk.{i}.{k}.weight": torch.randn(*sh, generator=g) / sh[1] ** 0.5
               for i in range(2) for k, sh in shapes.items()}
    weights |= {f"blk.{i}.{n}_norm.weight": torch.ones(1, 32) for i in range(2) for n in ("attn", "ffn")}
    weights |= {"token_embd.weight": torch.randn(50, 32, generator=g), "output_norm.weight": torch.ones(1, 32)}
    text = vlm_text.build_text_model(hp, weights, None, torch.float32)
    first, P = 3, 4
    x = torch.randn(2, first + 10 * P + 5, 32, generator=g)  # 10 frames of 4 tokens, then 5 chat tokens
    with torch.no_grad():
        plain = text(x)
        h, start = tv.stream_through_memory(text, x, first, P, 10, 11)  # |M| 11 frames: no pass
        assert start == 0 and torch.allclose(h, plain, atol=1e-5)
        h, start = tv.stream_through_memory(text, x, first, P, 10, 8)  # |M| 8: |C| 6, passes before frames 8, 10
        assert start == first + 8 * P  # the last step: frames 8-9 and the chat
        assert h.shape[1] == x.shape[1] - start
        assert not torch.allclose(h, plain[:, start:], atol=1e-3)  # the chat sees a shrunk, re-indexed memory
