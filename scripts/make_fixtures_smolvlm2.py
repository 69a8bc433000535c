"""Write a tiny random-weight SmolVLM2 pair (llama text model + idefics3 mmproj) with `gguf`.

The same idea as make_fixtures.py (the real llama.cpp on files that build in a second), for the family
that tiles its images. Two files:

* ``tiny-smolvlm2.gguf``: the tiny llama of make_fixtures.py (SmolVLM2's text model is SmolLM2, a llama)
  with SmolLM2's tokenizer plus the tokens SmolVLM2 adds and mtmd looks up around an image
  (<fake_token_around_image>, <global-img>, <row_1_col_1>).
* ``tiny-idefics3-mmproj.gguf``: projector type ``idefics3``: a SigLIP-style tower on 128 px tiles of
  16 px patches (8 x 8), a 2 x 2 pixel shuffle and one linear layer (mm.model.fc) to the text width: 4 x 4 =
  16 tokens a view. preproc_image_size (the longest edge a frame is resized to before tiling) is 256, so
  a 4:3 frame becomes 2 x 2 tiles plus a global view, as real SmolVLM2 files tile at 2048 px; the
  runtime decodes the global view only.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from scripts import make_fixtures as base

MARKERS = ["<fake_token_around_image>", "<global-img>", "<row_1_col_1>"]
IMAGE_SIZE = 128  # a tile and the global view
PATCH_SIZE = 16
SCALE_FACTOR = 2  # pixel shuffle: (128 / 16 / 2)^2 = 16 tokens a view
LONGEST_EDGE = 256  # frames are resized to this longest edge, then cut into 128 px tiles
V_N_EMBD, V_N_HEAD, V_N_FF, V_N_LAYER = 32, 2, 64, 2

MODEL_NAME = "tiny-smolvlm2.gguf"
MMPROJ_NAME = "tiny-idefics3-mmproj.gguf"


def write_mmproj(path: Path, seed: int, out_width: int = base.N_EMBD) -> None:
    rng = np.random.default_rng([seed, 21])
    w = gguf.GGUFWriter(None, "clip")
    w.add_name("edge-runtime tiny idefics3 projector (random weights, test fixture)")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "idefics3")  # clip-impl.h PROJECTOR_TYPE_NAMES
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH_SIZE)
    w.add_uint32("clip.vision.embedding_length", V_N_EMBD)
    w.add_uint32("clip.vision.feed_forward_length", V_N_FF)
    w.add_uint32("clip.vision.block_count", V_N_LAYER)
    w.add_uint32("clip.vision.projection_dim", out_width)
    w.add_uint32("clip.vision.attention.head_count", V_N_HEAD)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_uint32("clip.vision.projector.scale_factor", SCALE_FACTOR)
    w.add_uint32("clip.vision.preproc_image_size", LONGEST_EDGE)  # what convert_hf_to_gguf writes for SmolVLM
    w.add_bool("clip.use_gelu", True)
    w.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    w.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])

    base.add_vit(w, rng, (IMAGE_SIZE // PATCH_SIZE) ** 2, PATCH_SIZE, V_N_LAYER, pre_ln=False, post_ln=True)
    # After the pixel shuffle a token carries 2 x 2 patches: 4 x 32 in, the text width out.
    w.add_tensor("mm.model.fc.weight", base.normal(rng, out_width, SCALE_FACTOR**2 * V_N_EMBD))
    base.write_gguf(w, path)


def make_fixtures(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write the pair into ``out_dir``; keys ``"model"`` and ``"mmproj"``."""
    return base.write_pair(out_dir, seed, (MODEL_NAME, MMPROJ_NAME), write_text_model, write_mmproj)


def write_text_model(path: Path, seed: int, n_layer: int = base.N_LAYER, n_head_kv: int = base.N_HEAD_KV) -> None:
    fields = base.with_added_tokens(base.read_tokenizer_fields(base.smollm2_path()), MARKERS)
    base.write_text_model(Path(path), seed, fields, n_layer=n_layer, n_head_kv=n_head_kv)


def main() -> None:
    base.fixture_main(make_fixtures, __doc__)


if __name__ == "__main__":
    main()
