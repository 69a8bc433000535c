"""Write a tiny random-weight Gemma 3 pair (text model + SigLIP mmproj with the gemma3 projector) for tests.

Same architecture and projector type as the real Gemma 3 4B/12B/27B in llama.cpp, only tiny:

* ``tiny-gemma3.gguf``: a ``gemma3`` text model of width 64, 4 layers (4 query heads over 2 KV heads of 16
  dimensions, NeoX RoPE). Sliding-window attention as in the real model: every second layer is global
  (``attention.sliding_window_pattern`` 2, the real models use 6), the others see the last ``N_SWA`` = 32
  positions only, with their own RoPE base (``rope.freq_base_swa``); the global layers use linear RoPE
  scaling 8 like the 4B and larger models. llama.cpp gives such a model two KV caches (global and
  sliding, llama_kv_cache_iswa). Tokenizer and chat template are SmolLM2's, plus ``<start_of_image>`` and
  ``<end_of_image>`` as control tokens (mtmd wraps every image in them).
* ``tiny-gemma3-mmproj.gguf``: a SigLIP tower with the ``gemma3`` projector (average pool by
  ``projector.scale_factor``, RMS norm, linear map to the text width): a frame is resized to 64 x 64, cut
  into 8 x 8 patches, pooled 2 x 2, so (64 / 8 / 2)^2 = 16 image tokens a frame (the real model: 896 px,
  14 px patches, pool 4: 256). Gemma 3 decodes these tokens non-causally, all in one ubatch.

Same seed, same bytes.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from scripts.make_fixtures import (
    IMAGE_MEAN,
    IMAGE_STD,
    V_EPS,
    V_N_EMBD,
    V_N_FF,
    V_N_HEAD,
    add_vit,
    fixture_main,
    normal,
    read_tokenizer_fields,
    smollm2_path,
    with_added_tokens,
    write_gguf,
    write_pair,
)

ARCH = "gemma3"
N_EMBD = 64
N_LAYER = 4
N_HEAD = 4
N_HEAD_KV = 2
HEAD_DIM = 16
N_FF = 128
N_CTX_TRAIN = 4096
SWA_PATTERN = 2  # layers 1 and 3 global, 0 and 2 sliding (is_swa = il % pattern < pattern - 1)
N_SWA = 32  # the sliding layers see the last 32 positions: two frames
ROPE_FREQ_BASE = 1_000_000.0  # global layers, as in the real model
ROPE_FREQ_BASE_SWA = 10_000.0  # sliding layers
ROPE_SCALE_LINEAR = 8.0  # global layers of the 4B and larger models
RMS_EPS = 1e-6
IMAGE_MARKERS = ["<start_of_image>", "<end_of_image>"]

IMAGE_SIZE = 64
PATCH_SIZE = 8
POOL = 2  # clip.vision.projector.scale_factor: the real models pool 4 x 4
V_N_LAYER = 2

MODEL_NAME = "tiny-gemma3.gguf"
MMPROJ_NAME = "tiny-gemma3-mmproj.gguf"


def write_text_model(path: Path, seed: int, n_head_kv: int = N_HEAD_KV, sliding: list[bool] | None = None) -> None:
    """sliding: which layers are sliding-window ones, written as llama.cpp's per-layer pattern array; None:
    the periodic pattern (every SWA_PATTERN-th layer global), as the real models have it."""
    n_layer = len(sliding) if sliding is not None else N_LAYER
    rng = np.random.default_rng([seed, 30])
    tokenizer = with_added_tokens(read_tokenizer_fields(smollm2_path()), IMAGE_MARKERS)
    n_vocab = next(len(value) for key, _, value, _ in tokenizer if key == "tokenizer.ggml.tokens")
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("edge-runtime tiny gemma3 (random weights, test fixture)")
    w.add_uint32(f"{ARCH}.context_length", N_CTX_TRAIN)
    w.add_uint32(f"{ARCH}.embedding_length", N_EMBD)
    w.add_uint32(f"{ARCH}.block_count", n_layer)
    w.add_uint32(f"{ARCH}.feed_forward_length", N_FF)
    w.add_uint32(f"{ARCH}.attention.head_count", N_HEAD)
    w.add_uint32(f"{ARCH}.attention.head_count_kv", n_head_kv)
    w.add_uint32(f"{ARCH}.attention.key_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.value_length", HEAD_DIM)
    w.add_uint32(f"{ARCH}.attention.sliding_window", N_SWA)
    if sliding is None:
        w.add_uint32(f"{ARCH}.attention.sliding_window_pattern", SWA_PATTERN)
    else:
        w.add_array(f"{ARCH}.attention.sliding_window_pattern", [bool(x) for x in sliding])
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", RMS_EPS)
    w.add_float32(f"{ARCH}.rope.freq_base", ROPE_FREQ_BASE)
    w.add_float32(f"{ARCH}.rope.freq_base_swa", ROPE_FREQ_BASE_SWA)
    w.add_string(f"{ARCH}.rope.scaling.type", "linear")
    w.add_float32(f"{ARCH}.rope.scaling.factor", ROPE_SCALE_LINEAR)
    w.add_uint32(f"{ARCH}.vocab_size", n_vocab)
    for key, vtype, value, sub_type in tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub_type)

    w.add_tensor("token_embd.weight", normal(rng, n_vocab, N_EMBD).astype(np.float16))  # tied output head
    ones = np.ones(N_EMBD, dtype=np.float32)
    for il in range(n_layer):
        blk = f"blk.{il}"
        w.add_tensor(f"{blk}.attn_norm.weight", ones)
        w.add_tensor(f"{blk}.attn_q.weight", normal(rng, N_HEAD * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{blk}.attn_k.weight", normal(rng, n_head_kv * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{blk}.attn_v.weight", normal(rng, n_head_kv * HEAD_DIM, N_EMBD))
        w.add_tensor(f"{blk}.attn_output.weight", normal(rng, N_EMBD, N_HEAD * HEAD_DIM))
        w.add_tensor(f"{blk}.attn_q_norm.weight", np.ones(HEAD_DIM, dtype=np.float32))
        w.add_tensor(f"{blk}.attn_k_norm.weight", np.ones(HEAD_DIM, dtype=np.float32))
        w.add_tensor(f"{blk}.post_attention_norm.weight", ones)
        w.add_tensor(f"{blk}.ffn_norm.weight", ones)
        w.add_tensor(f"{blk}.ffn_gate.weight", normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.weight", normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_down.weight", normal(rng, N_EMBD, N_FF))
        w.add_tensor(f"{blk}.post_ffw_norm.weight", ones)
    w.add_tensor("output_norm.weight", ones)
    write_gguf(w, path)


def write_mmproj(path: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 31])
    w = gguf.GGUFWriter(None, "clip")
    w.add_name("edge-runtime tiny SigLIP + gemma3 projector (random weights, test fixture)")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "gemma3")
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    w.add_uint32("clip.vision.embedding_length", V_N_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", V_N_FF)
    w.add_uint32("clip.vision.block_count", V_N_LAYER)
    w.add_uint32("clip.vision.projection_dim", N_EMBD)
    w.add_uint32("clip.vision.attention.head_count", V_N_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", V_EPS)
    w.add_uint32("clip.vision.projector.scale_factor", POOL)
    w.add_array("clip.vision.image_mean", IMAGE_MEAN)
    w.add_array("clip.vision.image_std", IMAGE_STD)
    add_vit(w, rng, (IMAGE_SIZE // PATCH_SIZE) ** 2, PATCH_SIZE, V_N_LAYER, pre_ln=False, post_ln=True)  # SigLIP
    # gemma3 projector: RMS norm (mm.soft_emb_norm), then mm.input_projection [vision width -> text width]
    w.add_tensor("mm.soft_emb_norm.weight", np.ones(V_N_EMBD, dtype=np.float32))
    w.add_tensor("mm.input_projection.weight", normal(rng, V_N_EMBD, N_EMBD))
    write_gguf(w, path)


def make_fixtures(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the pair into ``out_dir`` and return ``{"model": ..., "mmproj": ...}``."""
    return write_pair(out_dir, seed, (MODEL_NAME, MMPROJ_NAME), write_text_model, write_mmproj)


def make_text_model(path: Path, n_head_kv: int, sliding: list[bool], seed: int = 0) -> Path:
    """A variant with other KV heads and another order of sliding and global layers (tests)."""
    write_text_model(Path(path), seed, n_head_kv=n_head_kv, sliding=sliding)
    return Path(path)


def main() -> None:
    fixture_main(make_fixtures, __doc__)


if __name__ == "__main__":
    main()
