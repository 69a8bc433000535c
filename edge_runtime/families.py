"""Model families: every family-specific rule, and the one verdict on what a model's memory supports.

`Family` holds what a family needs beyond llama.cpp + mtmd's defaults (frame size, which of mtmd's chunks
go into the cache, the patch grid), keyed by the mmproj's projector type. `MemorySupport` says, for one
model, whether its memory can be compressed at all and in which position modes, each refusal as one line
that names the family and the missing piece. The native pass decides the last part, in place or by copy,
at its first pass (it needs llama.cpp's tensors), and refuses any layout it does not consume exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

from edge_runtime.errors import SettingsError


@dataclass(frozen=True)
class Family:
    """What a model family needs beyond llama.cpp + mtmd's defaults: every family-specific knob is here."""

    name: str
    # M-RoPE projectors take any frame size (28 px a token for Qwen2/2.5-VL): resize the longer side to this
    # many px, aligned to whole tokens, so every frame of a stream has the same patch grid.
    frame_side: int | None = None
    # Tiling projectors (idefics3) cut a frame into tiles plus a global view: decode the global view only,
    # one image a frame, as SmolVLM2 sees video frames.
    global_view_only: bool = False
    # mtmd reports a non-M-RoPE image as nx = tokens, ny = 1 (mtmd.cpp split_batch_to_chunk). Projectors
    # whose tokens are a square grid, row by row (LLaVA's mlp on a square image, idefics3 after its pixel
    # shuffle), get that grid back, so that --pool pools 2-D neighbours.
    square_grid: bool = False
    # Decode mtmd's wrapper text (<|vision_start|> ... <|vision_end|>) once around the whole video instead of
    # around every frame: Qwen's own video format, and it leaves a frame exactly its image tokens.
    wrap_video_once: bool = False
    # Why the KV cache of this family cannot be compressed yet ("" when it can).
    not_compressible: str = ""


# By mmproj projector type (clip.projector_type, as tools/mtmd/clip-impl.h names them). Families not listed
# decode frames as mtmd makes them.
FAMILIES = {
    "qwen2vl_merger": Family("Qwen2-VL", frame_side=336, wrap_video_once=True),
    "qwen2.5vl_merger": Family("Qwen2.5-VL", frame_side=336, wrap_video_once=True),
    "qwen3vl_merger": Family("Qwen3-VL", frame_side=336, wrap_video_once=True,
                      not_compressible="interleaved M-RoPE and deepstack are not verified against a test model yet"),
    "idefics3": Family("SmolVLM/SmolVLM2 (idefics3)", global_view_only=True, square_grid=True, wrap_video_once=True),
    "mlp": Family("LLaVA (mlp)", square_grid=True),
}
GENERIC_FAMILY = Family("generic")


def family_of(projector: str, uses_mrope: bool) -> Family:
    """The family of an mmproj, by its projector type."""
    if projector in FAMILIES:
        return FAMILIES[projector]
    if uses_mrope:  # mtmd gives these M-RoPE positions too, but their cache has not been checked against a test model
        return Family(projector, not_compressible="its M-RoPE cache is not verified yet")
    return GENERIC_FAMILY


@dataclass(frozen=True)
class KVGeometry:
    """What the compression pass must know of the model to read and re-rotate its cached keys."""

    n_layer: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    rope_type: int  # llama.cpp's LLAMA_ROPE_TYPE_*: 0 normal (adjacent pairs), 2 NeoX (halves), 8+ M-RoPE
    n_rot: int  # rotated dimensions of each head
    freq_base: float
    freq_scale: float  # linear scaling: positions are multiplied by this
    scaling_type: str  # "" or "none" or "linear" can be re-rotated; YaRN and others cannot yet
    architecture: str
    rope_sections: tuple[int, ...] = ()  # M-RoPE: rotary pairs per section (t, h, w, e), e.g. (16, 24, 24, 0)
    freq_base_swa: float = 10000.0  # sliding-window layers' RoPE base (Gemma 3); they are never scaled

    @property
    def mrope(self) -> bool:
        return self.rope_type in (llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE,
                                  llama_cpp.LLAMA_ROPE_TYPE_VISION)


@dataclass(frozen=True)
class MemorySupport:
    """What one model's video memory supports: "" where it can, else the one-line reason it cannot."""

    family: str
    compress: str  # any compressing policy
    reindex: str  # positions re-indexed, keys re-rotated (keep mode needs nothing more than compress)

    def check(self, compresses: bool, positions: str) -> None:
        """Raise SettingsError (one line, what to do) if this memory cannot run that policy in that mode."""
        if compresses and self.compress:
            raise SettingsError(self.compress)
        if compresses and positions == "reindex" and self.reindex:
            raise SettingsError(self.reindex)


def memory_support(family: Family, geometry: KVGeometry, n_caches: int, recurrent: bool) -> MemorySupport:
    """The verdict, from the family, the model's RoPE and the parts of its sequence state (kv_state.hpp)."""
    compress = ""
    if family.not_compressible:
        compress = f"{family.name} cannot be compressed yet: {family.not_compressible}; use --policy full"
    elif n_caches > 1 and recurrent:
        # The parser and the pass would carry both parts, but no such model has been verified here.
        compress = (f"{geometry.architecture}: compressing a hybrid memory with a sliding window (two KV caches and a "
                    "recurrent state) is not verified yet; use --policy full")
    # M-RoPE (Qwen2/2.5-VL) re-rotates like NeoX once its sections say which pairs turn (native/kv_pass.cpp).
    mrope_ok = geometry.rope_type == llama_cpp.LLAMA_ROPE_TYPE_MROPE and len(geometry.rope_sections) == 4
    reindex = ""
    if (geometry.rope_type not in (0, 2) and not mrope_ok) or geometry.scaling_type not in ("", "none", "linear"):
        reindex = (f"{geometry.architecture} models (RoPE type {geometry.rope_type}, scaling "
                   f"'{geometry.scaling_type or 'none'}') cannot be re-indexed yet: use --positions keep")
    return MemorySupport(family=family.name, compress=compress, reindex=reindex)
