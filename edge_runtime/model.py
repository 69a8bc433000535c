"""The loaded model: one text GGUF, its mmproj (and a LoRA), shared by every memory made from it.

Loading weights and projector is separate from a memory: a `VisionLanguageModel` holds what all streams
share (weights, vocabulary, chat template, the projector), and each memory gets its own llama.cpp context
(edge_runtime/context.py). Everything that touches llama-cpp-python's ctypes handles lives in these two
files, so the session above them speaks in tokens, positions and numpy arrays. We use the low-level API on
purpose: the high-level `Llama` chat handlers re-evaluate the whole prompt and fail with "Prompt exceeds
n_ctx" instead of letting us manage the KV cache ourselves.
"""

from __future__ import annotations

import ctypes
import logging
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from edge_runtime.builtin import resolve_model
from edge_runtime.errors import ModelError
from edge_runtime.families import FAMILIES, GENERIC_FAMILY, KVGeometry, family_of
from edge_runtime.gguf_meta import check_gguf, gguf_int_array, projector_info
from edge_runtime.native_log import NATIVE_LOG
from edge_runtime.opencv import cv2

log = logging.getLogger(__name__)

_BACKEND_READY = False


@dataclass
class ModelConfig:
    """The model files, and how every context made from them runs."""

    model_path: Path
    mmproj_path: Path
    n_batch: int = 512  # also n_ubatch: non-causal image decoders need a whole image in one ubatch
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    flash_attn: str = "auto"  # auto | on | off; decides the V layout of the KV state (off: transposed)
    use_gpu: bool = True  # offload layers and the projector when llama.cpp was built with a GPU backend
    verbose: bool = False  # llama.cpp's own log on stderr
    cache_type: str = "f16"  # K and V cache type: f16 (compressible), f32, or q8_0 (half the memory, not yet)
    lora_path: Path | None = None  # a llama.cpp LoRA adapter GGUF for the text model (the trained edge-vlm has one)
    frame_side: int | None = None  # px of a frame's longer side for families that take any size (None: the family's)


@dataclass
class EncodedFrame:
    """One frame as mtmd prepared it (resized, normalised, tokenized), ready to encode and decode."""

    chunks: int  # mtmd_input_chunks*, freed by VisionLanguageModel.free_frame
    n_tokens: int  # KV cells the frame takes (image tokens + any wrapper text tokens)
    n_pos: int  # positions it takes: fewer than n_tokens on M-RoPE models
    nx: int  # patch grid of the image tokens
    ny: int
    decode: list[int] = field(default_factory=list)  # the chunks that go into the KV cache, in order
    wrapper: tuple[list[int], list[int]] = ((), ())  # text tokens mtmd puts around the decoded image
    image_tokens: int = 0  # of n_tokens, the image's (the rest: text around it, such as <start_of_image>)


CACHE_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml_type values


class VisionLanguageModel:
    """A text model + mmproj pair, loaded once; memories (edge_runtime.context.Context) are made from it."""

    def __init__(self, config: ModelConfig) -> None:
        global _BACKEND_READY
        self.config = config
        self.model = self.mtmd_ctx = self.lora = None
        self.contexts: weakref.WeakSet = weakref.WeakSet()  # made from this model: closed before it is freed
        config.model_path = resolve_model(config.model_path)
        check_gguf(Path(config.model_path), "text model", "--model")
        check_gguf(Path(config.mmproj_path), "mmproj", "--mmproj")
        if config.cache_type not in CACHE_TYPES:
            raise ModelError(f"unknown cache type {config.cache_type}; use one of {', '.join(CACHE_TYPES)}")
        NATIVE_LOG.install(config.verbose)
        NATIVE_LOG.clear()
        if not _BACKEND_READY:
            llama_cpp.llama_backend_init()
            _BACKEND_READY = True

        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = 999 if config.use_gpu else 0
        self.model = llama_cpp.llama_model_load_from_file(str(config.model_path).encode(), mparams)
        if not self.model:
            raise ModelError(
                f"llama.cpp could not load the text model {config.model_path}: {NATIVE_LOG.first_error()}"
            )
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        if config.lora_path is not None:
            self._load_lora(Path(config.lora_path))

        tparams = mtmd.mtmd_context_params_default()
        tparams.use_gpu = config.use_gpu
        tparams.n_threads = config.n_threads
        tparams.print_timings = False
        tparams.warmup = False  # a warm-up encode costs seconds on a Pi; the first frame pays instead
        self.projector, self.token_px, view_tokens = projector_info(Path(config.mmproj_path))
        self.family = FAMILIES.get(self.projector, GENERIC_FAMILY)  # until mtmd says whether it uses M-RoPE
        if self.family.global_view_only and view_tokens:
            # Only the global view is decoded: capping an image at one view's tokens makes mtmd cut a single
            # tile instead of up to 4 x 4 from a 2048 px resize (mtmd-image.cpp, idefics3 preprocess): the
            # global view is still the whole frame at the tile size, for a fraction of the resizing.
            tparams.image_max_tokens = view_tokens
        NATIVE_LOG.clear()
        self.mtmd_ctx = mtmd.mtmd_init_from_file(str(config.mmproj_path).encode(), self.model, tparams)
        if not self.mtmd_ctx:
            reason = NATIVE_LOG.first_error()
            self.close()
            raise ModelError(
                f"could not use the mmproj {config.mmproj_path} with the text model {config.model_path}: {reason}"
                " (pass the mmproj made for this text model)"
            )
        if not mtmd.mtmd_support_vision(self.mtmd_ctx):
            self.close()
            raise ModelError(f"the mmproj {config.mmproj_path} has no vision encoder (audio-only?)")
        self.marker = mtmd.mtmd_default_marker()
        self.uses_mrope = bool(mtmd.mtmd_decode_use_mrope(self.mtmd_ctx))
        self.family = family_of(self.projector, self.uses_mrope)
        if config.frame_side is not None and config.frame_side < 1:
            self.close()
            raise ModelError(f"a frame size must be a positive number of px, not {config.frame_side}")
        if config.frame_side is not None and not self.token_px:
            log.warning("the frame size has no effect on %s: its projector resizes every frame to its own size",
                        self.family.name if self.family is not GENERIC_FAMILY else self.projector or "this model")
        self._piece = ctypes.create_string_buffer(256)
        self.chat_template = llama_cpp.llama_model_chat_template(self.model, None)
        self.description = self._describe()

    def _load_lora(self, path: Path) -> None:
        """Load a LoRA adapter GGUF (llama.cpp frees it with the model); every context applies it at scale 1."""
        check_gguf(path, "LoRA adapter", "--lora")
        NATIVE_LOG.clear()
        self.lora = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not self.lora:
            reason = NATIVE_LOG.first_error()
            self.close()
            raise ModelError(f"could not use the LoRA adapter {path} with the text model {self.config.model_path}: "
                             f"{reason} (pass the adapter trained for this text model)")

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value of the text model as a string, or None when absent."""
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def kv_geometry(self) -> KVGeometry:
        """The model's layers, heads and RoPE as its GGUF says (the pass re-rotates keys with them)."""
        arch = self.metadata("general.architecture") or "llama"
        n_head = llama_cpp.llama_model_n_head(self.model)
        head_dim = self.n_embd // n_head

        def number(key: str, default: float) -> float:
            value = self.metadata(f"{arch}.{key}")
            return float(value) if value is not None else default

        return KVGeometry(
            n_layer=llama_cpp.llama_model_n_layer(self.model),
            n_head_kv=llama_cpp.llama_model_n_head_kv(self.model),
            head_dim_k=int(number("attention.key_length", head_dim)),
            head_dim_v=int(number("attention.value_length", head_dim)),
            rope_type=llama_cpp.llama_model_rope_type(self.model),
            n_rot=int(number("rope.dimension_count", head_dim)),
            freq_base=number("rope.freq_base", 10000.0),
            freq_scale=llama_cpp.llama_model_rope_freq_scale_train(self.model),
            scaling_type=self.metadata(f"{arch}.rope.scaling.type") or "",
            architecture=arch,
            # llama.cpp's metadata API leaves arrays out: read the sections from the file (M-RoPE only).
            rope_sections=tuple(gguf_int_array(Path(self.config.model_path), f"{arch}.rope.dimension_sections"))
            if self.uses_mrope else (),
            # llama.cpp's default when the GGUF has no rope.freq_base_swa (llama_hparams)
            freq_base_swa=number("rope.freq_base_swa", 10000.0),
        )

    def _describe(self) -> str:
        buf = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, buf, len(buf))
        return buf.value.decode(errors="replace")

    # -- text ---------------------------------------------------------------------------------------

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        data = text.encode()
        n_max = len(data) + 8
        tokens = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, n_max, add_special, True)
        if n < 0:  # buffer too small: llama.cpp returns minus the count it needs
            n_max = -n
            tokens = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), tokens, n_max, add_special, True)
        return list(tokens[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """A token's text; special: also control tokens (<global-img>), as mtmd looks them up."""
        n = llama_cpp.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        return self._piece.raw[: max(n, 0)]

    def is_end_of_generation(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def chat_prompt(self, messages: list[tuple[str, str]], add_assistant: bool) -> str:
        """Render (role, content) messages with the chat template stored in the model's GGUF."""
        if self.chat_template is None:
            raise ModelError("the text model has no chat template (tokenizer.chat_template); use a chat model")
        arr = (llama_cpp.llama_chat_message * len(messages))()
        keep = []  # the C strings must outlive the call
        for i, (role, content) in enumerate(messages):
            keep += [role.encode(), content.encode()]
            arr[i].role, arr[i].content = keep[-2], keep[-1]
        size = 4 * sum(len(c) for _, c in messages) + 1024
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(self.chat_template, arr, len(messages), add_assistant,
                                                    buf, size)
            if n < 0:
                raise ModelError("llama.cpp does not know this model's chat template; use a model whose "
                                 "template it supports (ChatML, Llama 3, Gemma, Qwen, ...)")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        raise ModelError("chat template output kept growing")  # pragma: no cover

    # -- frames --------------------------------------------------------------------------------------

    def frame_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) a frame is resized to before mtmd sees it: the family's size, or as it comes."""
        side = self.config.frame_side or self.family.frame_side
        if side is None or self.token_px <= 0:
            return width, height
        scale = side / max(width, height)
        px = self.token_px
        return (max(px, round(width * scale / px) * px), max(px, round(height * scale / px) * px))

    def encode_frame(self, rgb: np.ndarray) -> EncodedFrame:
        """Run the projector on one contiguous H x W x 3 RGB frame; the embeddings stay in mtmd."""
        h, w = rgb.shape[:2]
        size = self.frame_size(w, h)
        if size != (w, h):
            rgb = np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_AREA))
            w, h = size
        bitmap = mtmd.mtmd_bitmap_init(w, h, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            text = mtmd.mtmd_input_text(self.marker, len(self.marker), False, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = mtmd.mtmd_tokenize(self.mtmd_ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise ModelError(f"mtmd could not tokenize a {w}x{h} frame (code {rc})")
        except BaseException:
            mtmd.mtmd_input_chunks_free(chunks)
            raise
        finally:
            mtmd.mtmd_bitmap_free(bitmap)
        frame = EncodedFrame(chunks=chunks, n_tokens=0, n_pos=0, nx=0, ny=0)
        try:
            self._choose_chunks(frame)
        except BaseException:
            self.free_frame(frame)
            raise
        for i in frame.decode:
            chunk = mtmd.mtmd_input_chunks_get(chunks, i)
            n = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
            frame.n_tokens += n
            frame.n_pos += mtmd.mtmd_input_chunk_get_n_pos(chunk)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                image = mtmd.mtmd_input_chunk_get_tokens_image(chunk)
                frame.nx = mtmd.mtmd_image_tokens_get_nx(image)
                frame.ny = mtmd.mtmd_image_tokens_get_ny(image)
                frame.image_tokens += n
                # A non-causal image (Gemma 3) must be decoded in one ubatch: mtmd would split it into
                # batches that cannot see each other, a silently different memory.
                if mtmd.mtmd_decode_use_non_causal(self.mtmd_ctx, chunk) and n > self.config.n_batch:
                    self.free_frame(frame)
                    raise ModelError(f"{self.metadata('general.architecture')} decodes each image non-causally in "
                                     f"one batch: the batch size (n_batch = n_ubatch, {self.config.n_batch}) must "
                                     f"be at least the frame's {n} image tokens")
        if self.family.square_grid and frame.ny == 1:
            side = int(round(frame.nx ** 0.5))
            if side * side != frame.nx * frame.ny:
                self.free_frame(frame)
                raise ModelError(f"{self.family.name}: an image of {frame.nx * frame.ny} tokens is not a "
                                 "square patch grid, which compression needs")
            frame.nx = frame.ny = side
        return frame

    def chunk_text_tokens(self, chunk: int) -> list[int]:
        """The tokens of one of mtmd's text chunks."""
        n = ctypes.c_size_t(0)
        ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
        return list(ptr[: n.value])

    def _choose_chunks(self, frame: EncodedFrame) -> None:
        """Which of mtmd's chunks go into the KV cache: all, or (wrap_video_once) one image without its wrapper."""
        n_chunks = mtmd.mtmd_input_chunks_size(frame.chunks)
        kinds = [mtmd.mtmd_input_chunk_get_type(mtmd.mtmd_input_chunks_get(frame.chunks, i)) for i in range(n_chunks)]
        images = [i for i, k in enumerate(kinds) if k == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
        if not self.family.wrap_video_once:
            frame.decode = list(range(n_chunks))
            return
        if not images:
            raise ModelError(f"{self.family.name}: mtmd made no image from a frame")
        if self.family.global_view_only:
            # idefics3 adds the global view after the tiles (mtmd.cpp: ov_img_first is false), after the
            # text "<fake_token_around_image><global-img>"; check that, so a change in mtmd fails loudly.
            chosen = images[-1]
            before = self.chunk_text_tokens(mtmd.mtmd_input_chunks_get(frame.chunks, chosen - 1)) if chosen else []
            if not before or self.token_bytes(before[-1], special=True) != b"<global-img>":
                raise ModelError(f"{self.family.name}: mtmd's last image of a frame is not its global view "
                                 "(<global-img>); this llama.cpp lays out tiles differently")
        elif len(images) == 1:
            chosen = images[0]
        else:
            raise ModelError(f"{self.family.name}: mtmd cut a frame into {len(images)} images; one image a frame "
                             "is needed (a smaller frame size?)")
        frame.decode = [chosen]
        around = []
        for i in (chosen - 1, chosen + 1):
            ok = 0 <= i < n_chunks and kinds[i] == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT
            around.append(self.chunk_text_tokens(mtmd.mtmd_input_chunks_get(frame.chunks, i)) if ok else [])
        if any(t < 0 for t in around[0] + around[1]):
            raise ModelError(f"{self.family.name}: the text model's vocabulary lacks the tokens mtmd puts around an "
                             "image (pass the text model made for this mmproj)")
        frame.wrapper = (around[0], around[1])

    def video_wrapper(self) -> tuple[list[int], list[int]]:
        """Text tokens to decode once before and once after the whole video (wrap_video_once families)."""
        if not self.family.wrap_video_once:
            return [], []
        probe = self.encode_frame(np.zeros((64, 64, 3), np.uint8))
        self.free_frame(probe)
        return list(probe.wrapper[0]), list(probe.wrapper[1])

    def frame_embeddings(self, rgb: np.ndarray) -> np.ndarray:
        """The projector's output for one H x W x 3 RGB uint8 frame: [n_tokens, n_embd] float32 (a copy).

        Only the vision encoder runs; nothing is decoded and the KV cache is untouched. This is how an
        exported mmproj is checked against the PyTorch model it came from (scripts/check_mmproj.py).
        """
        frame = self.encode_frame(np.ascontiguousarray(rgb, dtype=np.uint8))
        try:
            for i in frame.decode:
                chunk = mtmd.mtmd_input_chunks_get(frame.chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) != mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                    continue  # the marker's wrapper text, if the model has any
                if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                    raise ModelError(f"the projector failed on a frame: {NATIVE_LOG.first_error(latest=True)}")
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                embd = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
                # The buffer belongs to mtmd and the next encode overwrites it: copy it out.
                return np.ctypeslib.as_array(embd, shape=(n_tokens, self.n_embd)).copy()
            raise ModelError("mtmd made no image chunk from the frame")
        finally:
            self.free_frame(frame)

    @staticmethod
    def free_frame(frame: EncodedFrame) -> None:
        if frame.chunks:
            mtmd.mtmd_input_chunks_free(frame.chunks)
            frame.chunks = 0

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free the projector and the weights, after every context made from this model."""
        for context in list(self.contexts):
            context.close()
        if self.mtmd_ctx:
            mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> VisionLanguageModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
