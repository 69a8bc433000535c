"""scripts/vlm_text.py: the attention's key weight means what the trainer relies on.

train_vlm counts each empty frame of a short clip as several frames (the long stream it stands for) by
weighting its tokens in every softmax. That is only honest if a token weighted n attends exactly like n
identical copies of it: pinned here on a one-layer random model, where the copies can be written out.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

HPARAMS = {"n_layer": 1, "n_embd": 32, "n_ff": 48, "n_head": 4, "n_head_kv": 2, "rope_base": 10000.0,
           "n_rot": 8, "eps": 1e-5}


@pytest.fixture(scope="module")
def text_model() -> torch.nn.Module:
    from scripts import vlm_text

    g = torch.Generator().manual_seed(0)
    e, ff, kv = HPARAMS["n_embd"], HPARAMS["n_ff"], HPARAMS["n_embd"] // HPARAMS["n_head"] * HPARAMS["n_head_kv"]
    shapes = {"attn_q": (e, e), "attn_k": (kv, e), "attn_v": (kv, e), "attn_output": (e, e),
              "ffn_gate": (ff, e), "ffn_up": (ff, e), "ffn_down": (e, ff)}
    weights = {f"blk.0.{k}.weight": torch.randn(*s, generator=g) / s[1] ** 0.5 for k, s in shapes.items()}
    weights |= {"blk.0.attn_norm.weight": torch.ones(1, e), "blk.0.ffn_norm.weight": torch.ones(1, e),
                "token_embd.weight": torch.randn(50, e, generator=g), "output_norm.weight": torch.ones(1, e)}
    return vlm_text.build_text_model(HPARAMS, weights, None, torch.float32)


def test_a_token_weighted_n_attends_as_n_copies_of_it(text_model: torch.nn.Module) -> None:
    x = torch.randn(1, 10, HPARAMS["n_embd"], generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10)[None] * 7
    weight = torch.ones(1, 10)
    weight[0, 3] = 3.0  # token 3 stands for three copies of itself
    with torch.no_grad():
        weighted = text_model(x, positions, weight)
        copies = [0, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9]  # written out, at the same position
        written = text_model(x[:, copies], positions[:, copies])
    # Token 3 itself sees all three copies only as the last of them; everything after sees all three.
    assert torch.allclose(weighted[:, 3:], written[:, 5:], atol=1e-5)
    assert torch.allclose(weighted[:, :3], written[:, :3], atol=1e-5)
    assert not torch.allclose(weighted[:, 4:], text_model(x, positions)[:, 4:], atol=1e-3)  # the weight matters


def test_weight_one_is_the_plain_causal_model(text_model: torch.nn.Module) -> None:
    x = torch.randn(2, 9, HPARAMS["n_embd"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(text_model(x, None, torch.ones(2, 9)), text_model(x), atol=1e-5)


def test_tokens_after_a_shrunk_memory_attend_as_if_it_never_held_the_dropped_keys(
        text_model: torch.nn.Module) -> None:
    """What training under compression relies on: a memory of kept keys, each KV head its own, re-rotated."""
    x = torch.randn(1, 12, HPARAMS["n_embd"], generator=torch.Generator().manual_seed(3))
    positions = torch.arange(12)[None] * 5
    split, kept = 8, [0, 2, 3, 6, 7]  # tokens 0-7 were in the cache at the pass; 8-11 come after it

    def memory(per_head: list[list[int]], record: list) -> list:
        k, v = record[0]  # [1, n_kv, split, head_dim]; each head's keys rotated to their own positions
        keys = [text_model.rotate(k[:, h, heads], positions[0, heads]) for h, heads in enumerate(per_head)]
        return [(torch.stack(keys, 1), torch.stack([v[:, h, heads] for h, heads in enumerate(per_head)], 1))]

    record: list = []
    with torch.no_grad():
        text_model(x[:, :split], positions[:, :split], record=record)
        after = text_model(x[:, split:], positions[:, split:], memory=memory([kept, kept], record))
        without = text_model(x[:, kept + list(range(split, 12))], positions[:, kept + list(range(split, 12))])
        whole = text_model(x, positions)
        everything = text_model(x[:, split:], positions[:, split:], memory=memory([list(range(split))] * 2, record))
        mixed = text_model(x[:, split:], positions[:, split:], memory=memory([kept, [0, 1, 4, 5, 7]], record))
    assert torch.allclose(after, without[:, len(kept):], atol=1e-5)
    assert torch.allclose(everything, whole[:, split:], atol=1e-5)  # nothing dropped: the plain causal model
    assert not torch.allclose(mixed, after, atol=1e-4)  # each KV head has its own memory
