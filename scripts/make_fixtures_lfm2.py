"""Write a tiny random-weight LFM2-VL pair (hybrid text model + SigLIP mmproj with the lfm2 projector) for tests.

Same architecture and projector type as the real LFM2-VL in llama.cpp, only tiny:

* ``tiny-lfm2.gguf``: an ``lfm2`` text model of width 64 and 4 layers: short-convolution layers 0 and 2 and
  attention layers 1 and 3 (4 query heads over 2 KV heads of 16 dimensions, NeoX RoPE, Q/K norms). As in
  the real model, a layer is a convolution layer exactly when its ``attention.head_count_kv`` entry is 0,
  and layer 0 is one. llama.cpp gives it hybrid memory: a KV cache for the attention layers and a
  recurrent state (the last ``shortconv.l_cache`` - 1 inputs of every convolution) for the others.
  Tokenizer and chat template are SmolLM2's, plus ``<|image_start|>`` and ``<|image_end|>`` as control
  tokens (mtmd wraps every image in them).
* ``tiny-lfm2-mmproj.gguf``: a SigLIP tower with the ``lfm2`` projector (pixel unshuffle by
  ``projector.scale_factor`` 2, then a GELU MLP to the text width), with the real model's 16 px patches:
  mtmd resizes each frame keeping its aspect ratio to between 64 and 256 tokens, so a 320 x 240 frame
  becomes 320 x 256 px, 20 x 16 patches, 10 x 8 = 80 image tokens (as with the real LFM2-VL).

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

ARCH = "lfm2"
N_EMBD = 64
HEAD_KV_PER_LAYER = [0, 2, 0, 2]  # 0: a short-convolution layer (no KV cache)
N_HEAD = 4
HEAD_DIM = N_EMBD // N_HEAD  # 16
N_FF = 128
N_CTX_TRAIN = 4096
CONV_L_CACHE = 3  # kernel length: the recurrent state keeps the last 2 inputs of each convolution layer
ROPE_FREQ_BASE = 1_000_000.0
RMS_EPS = 1e-5
IMAGE_MARKERS = ["<|image_start|>", "<|image_end|>"]

IMAGE_SIZE = 64  # the learned position grid (4 x 4), resized by mtmd to each frame's patch grid
PATCH_SIZE = 16
MERGE = 2  # clip.vision.projector.scale_factor: 2 x 2 patches become one token
V_N_LAYER = 2
MM_HIDDEN = 64

MODEL_NAME = "tiny-lfm2.gguf"
MMPROJ_NAME = "tiny-lfm2-mmproj.gguf"


def write_text_model(path: Path, seed: int, head_kv_per_layer: list[int] | None = None,
                     sliding_window: int = 0) -> None:
    """head_kv_per_layer: KV heads of each layer, 0 for a convolution layer (default HEAD_KV_PER_LAYER).
    sliding_window > 0: the attention layers see only that many positions (llama.cpp then gives the model
    hybrid memory with a sliding-window cache, llama_memory_hybrid_iswa)."""
    head_kv_per_layer = list(HEAD_KV_PER_LAYER if head_kv_per_layer is None else head_kv_per_layer)
    rng = np.random.default_rng([seed, 40])
    tokenizer = with_added_tokens(read_tokenizer_fields(smollm2_path()), IMAGE_MARKERS)
    n_vocab = next(len(value) for key, _, value, _ in tokenizer if key == "tokenizer.ggml.tokens")
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("edge-runtime tiny lfm2 (random weights, test fixture)")
    w.add_uint32(f"{ARCH}.context_length", N_CTX_TRAIN)
    w.add_uint32(f"{ARCH}.embedding_length", N_EMBD)
    w.add_uint32(f"{ARCH}.block_count", len(head_kv_per_layer))
    w.add_uint32(f"{ARCH}.feed_forward_length", N_FF)
    w.add_uint32(f"{ARCH}.attention.head_count", N_HEAD)
    w.add_array(f"{ARCH}.attention.head_count_kv", head_kv_per_layer)
    w.add_float32(f"{ARCH}.attention.layer_norm_rms_epsilon", RMS_EPS)
    w.add_float32(f"{ARCH}.rope.freq_base", ROPE_FREQ_BASE)
    w.add_uint32(f"{ARCH}.shortconv.l_cache", CONV_L_CACHE)
    if sliding_window:
        w.add_uint32(f"{ARCH}.attention.sliding_window", sliding_window)
    w.add_uint32(f"{ARCH}.vocab_size", n_vocab)
    for key, vtype, value, sub_type in tokenizer:
        w.add_key_value(key, value, vtype, sub_type=sub_type)

    w.add_tensor("token_embd.weight", normal(rng, n_vocab, N_EMBD).astype(np.float16))  # tied output head
    ones = np.ones(N_EMBD, dtype=np.float32)
    for il, n_head_kv in enumerate(head_kv_per_layer):
        blk = f"blk.{il}"
        w.add_tensor(f"{blk}.attn_norm.weight", ones)  # the "operator norm" before either block
        if n_head_kv:
            w.add_tensor(f"{blk}.attn_q.weight", normal(rng, N_HEAD * HEAD_DIM, N_EMBD))
            w.add_tensor(f"{blk}.attn_k.weight", normal(rng, n_head_kv * HEAD_DIM, N_EMBD))
            w.add_tensor(f"{blk}.attn_v.weight", normal(rng, n_head_kv * HEAD_DIM, N_EMBD))
            w.add_tensor(f"{blk}.attn_output.weight", normal(rng, N_EMBD, N_EMBD))
            w.add_tensor(f"{blk}.attn_q_norm.weight", np.ones(HEAD_DIM, dtype=np.float32))
            w.add_tensor(f"{blk}.attn_k_norm.weight", np.ones(HEAD_DIM, dtype=np.float32))
        else:
            # ggml ne [l_cache, n_embd]: one kernel of CONV_L_CACHE taps per channel
            w.add_tensor(f"{blk}.shortconv.conv.weight", normal(rng, N_EMBD, CONV_L_CACHE) * 10)
            w.add_tensor(f"{blk}.shortconv.in_proj.weight", normal(rng, 3 * N_EMBD, N_EMBD))
            w.add_tensor(f"{blk}.shortconv.out_proj.weight", normal(rng, N_EMBD, N_EMBD))
        w.add_tensor(f"{blk}.ffn_norm.weight", ones)
        w.add_tensor(f"{blk}.ffn_gate.weight", normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_up.weight", normal(rng, N_FF, N_EMBD))
        w.add_tensor(f"{blk}.ffn_down.weight", normal(rng, N_EMBD, N_FF))
    w.add_tensor("token_embd_norm.weight", ones)  # LFM2's final norm carries this name in llama.cpp
    write_gguf(w, path)


def write_mmproj(path: Path, seed: int) -> None:
    rng = np.random.default_rng([seed, 41])
    w = gguf.GGUFWriter(None, "clip")
    w.add_name("edge-runtime tiny SigLIP + lfm2 projector (random weights, test fixture)")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "lfm2")
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    w.add_uint32("clip.vision.embedding_length", V_N_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", V_N_FF)
    w.add_uint32("clip.vision.block_count", V_N_LAYER)
    w.add_uint32("clip.vision.projection_dim", N_EMBD)
    w.add_uint32("clip.vision.attention.head_count", V_N_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", V_EPS)
    w.add_uint32("clip.vision.projector.scale_factor", MERGE)
    w.add_array("clip.vision.image_mean", IMAGE_MEAN)
    w.add_array("clip.vision.image_std", IMAGE_STD)
    add_vit(w, rng, (IMAGE_SIZE // PATCH_SIZE) ** 2, PATCH_SIZE, V_N_LAYER, pre_ln=False, post_ln=True)  # SigLIP2
    # lfm2 projector: pixel unshuffle (MERGE^2 patches side by side), then mm.1 -> GELU -> mm.2
    merged = V_N_EMBD * MERGE * MERGE
    w.add_tensor("mm.1.weight", normal(rng, MM_HIDDEN, merged))
    w.add_tensor("mm.1.bias", np.zeros(MM_HIDDEN, dtype=np.float32))
    w.add_tensor("mm.2.weight", normal(rng, N_EMBD, MM_HIDDEN))
    w.add_tensor("mm.2.bias", np.zeros(N_EMBD, dtype=np.float32))
    write_gguf(w, path)


def make_fixtures(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the pair into ``out_dir`` and return ``{"model": ..., "mmproj": ...}``."""
    return write_pair(out_dir, seed, (MODEL_NAME, MMPROJ_NAME), write_text_model, write_mmproj)


def make_text_model(path: Path, head_kv_per_layer: list[int], seed: int = 0, sliding_window: int = 0) -> Path:
    """A variant with other layers (0: convolution), KV heads or a sliding window (tests)."""
    write_text_model(Path(path), seed, head_kv_per_layer=head_kv_per_layer, sliding_window=sliding_window)
    return Path(path)


def main() -> None:
    fixture_main(make_fixtures, __doc__)


if __name__ == "__main__":
    main()
