"""The streaming API: insert a frame, ask a question, read the status.

The KV cache of sequence 0 holds, in order: the chat template's opening (system prompt and the start of
the user turn), then every frame the policy has kept. A question is decoded on top, answered, and
removed again, so the video memory after a question is exactly what it was before. When the video
tokens would pass the budget |M|, the policy picks |C| per layer and KV head and the native pass rewrites
the cache (the bookkeeping of what each slot holds is in memory.py).
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import llama_cpp
import numpy as np

from edge_runtime import _native
from edge_runtime.memory import FrameRecord, SlotTable, VideoMemory
from edge_runtime.model import KVGeometry, ModelError, VisionLanguageModel
from edge_runtime.policies import FullCache, MemoryFull, Policy, SettingsError
from edge_runtime.sources import Frame

log = logging.getLogger(__name__)

VIDEO_MARK = "<__edge_runtime_video__>"  # stands for the video in the rendered chat template


@dataclass
class SessionConfig:
    system_prompt: str = (
        "You are watching a live video stream, one frame at a time. "
        "Answer questions about what you have seen briefly and precisely."
    )
    question_room: int = 512  # KV cells kept free for a question, its history and the answer
    max_answer_tokens: int = 128
    history_tokens: int = 256  # earlier turns given back as text, newest first, up to this many tokens
    temperature: float = 0.0  # greedy: the same memory and question give the same answer
    seed: int = 0
    budget: int | None = None  # |M| video tokens; None: all the context holds (the full cache's limit)
    keep_fraction: float = 0.75  # |C| = 0.75 |M| (the paper's default), rounded down to whole frames
    positions: str = "reindex"  # reindex: compact positions, keys re-rotated; keep: original rotations
    direct_pass: bool = True  # compress llama.cpp's KV tensors in place when it can (CPU cache, reindex)


@dataclass(frozen=True)
class IngestTiming:
    prepare_ms: float  # colour conversion + mtmd's preprocessing (resize, normalise)
    encode_ms: float  # the vision encoder and projector
    decode_ms: float  # the language model writing the frame into its KV cache
    compress_ms: float  # the compression pass, zero when none ran before this frame


@dataclass(frozen=True)
class Answer:
    question: str
    text: str
    ttft_ms: float
    total_ms: float
    n_tokens: int
    tokens_per_s: float
    frames: int
    video_tokens: int


@dataclass(frozen=True)
class Status:
    frames: int  # frames ingested since the start
    frames_in_memory: int
    video_tokens: int
    kv_bytes: int  # bytes of sequence 0's state (cells + K + V) as llama.cpp serialises it
    rss_mb: float
    peak_rss_mb: float
    frames_per_s: float
    capacity: int
    budget: int
    passes: int  # compression passes so far
    next_pos: int  # the position the next frame takes: bounded in reindex mode


def compressed_cache_geometry(geometry: KVGeometry, parts: dict) -> KVGeometry:
    """The layers and KV heads of the cache the pass compresses, as the state says (_native.state_parts).

    That is the first KV cache, which holds every token: all layers of a plain model, only the global layers
    of a sliding-window model (Gemma 3), only the attention layers of a hybrid one (LFM2, whose layer 0 is a
    convolution: the model-wide n_head_kv is 0 there).
    """
    first = parts["caches"][0]
    elem = {"f16": 2, "f32": 4}.get(first["k_types"][0]) if first["k_types"] else None
    n_head_kv = first["k_row_bytes"][0] // (elem * geometry.head_dim_k) if elem else geometry.n_head_kv
    return dataclasses.replace(geometry, n_layer=len(first["k_row_bytes"]), n_head_kv=n_head_kv)


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident memory of this process in MiB, read from the OS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * resource.getpagesize() / 2**20, peak
    except OSError:  # not Linux: the peak is the best we have
        return peak, peak


class Session:
    """One video memory on one model. Not thread-safe: call it from one thread."""

    def __init__(self, model: VisionLanguageModel, config: SessionConfig | None = None,
                 policy: Policy | None = None) -> None:
        self.model = model
        self.config = config or SessionConfig()
        self.policy = policy or FullCache()
        self.history: list[tuple[str, str]] = []
        self.frames_seen = 0
        self._started = time.perf_counter()

        opening = model.chat_prompt([("system", self.config.system_prompt), ("user", VIDEO_MARK)], False)
        self.opening_text = opening.split(VIDEO_MARK)[0]  # system prompt and the start of the user turn
        # Families that wrap the whole video once (Qwen: <|vision_start|> ... <|vision_end|>): the opening
        # wrapper ends the prefix, the closing one starts every question.
        video_open, self.video_close = model.video_wrapper()
        prefix = model.tokenize(self.opening_text, add_special=True) + video_open
        capacity = model.n_ctx - len(prefix) - self.config.question_room
        if capacity <= 0:
            raise ModelError(f"a context of {model.n_ctx} tokens leaves no room for video after the system "
                             f"prompt ({len(prefix)}) and the question room ({self.config.question_room})")
        self.geometry = model.kv_geometry()
        budget = self._check_settings(capacity, len(prefix))
        model.remove_positions(0)  # a fresh memory, also when a model is reused
        model.decode_tokens(prefix, 0)
        # What the state holds besides the one KV cache every model has (the sliding-window cache of Gemma 3,
        # the recurrent state of LFM2): the pass carries it, questions save and restore it.
        self.state_parts = _native.state_parts(model.ctx_address, self.geometry.mrope)
        self.geometry = compressed_cache_geometry(self.geometry, self.state_parts)
        self._check_family()
        slots = SlotTable(self.geometry.n_layer, self.geometry.n_head_kv, capacity)
        self.memory = VideoMemory(capacity=capacity, budget=budget, prefix_tokens=len(prefix),
                                  next_pos=len(prefix), slots=slots)
        self._pass: _native.KVPass | None = None  # made at the first compression, sized for the budget
        self._direct: bool | None = None  # whether the in-place path applies; decided at the first pass
        # The last pass's timings (read, select, apply), the bytes of the state it read, and which path ran:
        # "direct" (in place; a native selection also moves each layer, so apply only frees the rest) or
        # "portable" (the state copied out and back).
        self.last_pass: dict[str, float | str] = {}

    def _check_settings(self, capacity: int, n_prefix: int) -> int:
        cfg = self.config
        if cfg.budget is None:
            return capacity
        if cfg.budget > capacity:
            raise SettingsError(f"a budget of {cfg.budget} video tokens needs a context of at least "
                                f"{cfg.budget + n_prefix + cfg.question_room} tokens (--ctx), not {self.model.n_ctx}")
        if not 0.0 < cfg.keep_fraction < 1.0:
            raise SettingsError(f"|C| must be smaller than |M|: the keep fraction must be in (0, 1), not "
                                f"{cfg.keep_fraction}")
        if cfg.positions not in ("keep", "reindex"):
            raise SettingsError(f"positions must be keep or reindex, not {cfg.positions}")
        geometry = self.geometry
        family = self.model.family
        if family.not_compressible and self.policy.compresses:
            raise SettingsError(f"{family.name} cannot be compressed yet: {family.not_compressible}; use --policy full")
        if cfg.positions == "reindex" and self.policy.compresses:
            # M-RoPE (Qwen2/2.5-VL) re-rotates like NeoX once its sections say which pairs turn (native/kv_pass.cpp).
            mrope_ok = geometry.rope_type == llama_cpp.LLAMA_ROPE_TYPE_MROPE and len(geometry.rope_sections) == 4
            if (geometry.rope_type not in (0, 2) and not mrope_ok) or geometry.scaling_type not in ("", "none",
                                                                                                    "linear"):
                raise SettingsError(
                    f"{geometry.architecture} models (RoPE type {geometry.rope_type}, scaling "
                    f"'{geometry.scaling_type or 'none'}') cannot be re-indexed yet: use --positions keep")
        return cfg.budget

    def _check_family(self) -> None:
        """What a model family's memory cannot do yet: one line naming the family and the missing piece."""
        arch = self.geometry.architecture
        if len(self.state_parts["caches"]) > 1 and self.state_parts["recurrent"] is not None and self.policy.compresses:
            # The parser and the pass would carry both parts, but no such model has been verified here.
            raise SettingsError(f"{arch}: compressing a hybrid memory with a sliding window (two KV caches and a "
                                "recurrent state) is not verified yet; use --policy full")

    # -- frames --------------------------------------------------------------------------------------

    def insert_frame(self, frame: Frame) -> tuple[FrameRecord, IngestTiming]:
        """Encode one frame and append it to the video memory, compressing first if it would pass |M|."""
        t0 = time.perf_counter()
        rgb = cv2.cvtColor(frame.image, cv2.COLOR_BGR2RGB)  # mtmd wants contiguous RGB bytes
        encoded = self.model.encode_frame(rgb)
        mem = self.memory
        t1 = time.perf_counter()
        compress_ms = 0.0
        try:
            if encoded.n_tokens > mem.budget:
                raise SettingsError(f"one frame needs {encoded.n_tokens} tokens but the video memory holds "
                                    f"{mem.budget}: raise --budget or --ctx, or lower --question-room")
            if mem.video_tokens + encoded.n_tokens > mem.budget:
                if not self.policy.compresses:
                    raise MemoryFull(
                        f"video memory full after {len(mem.records)} frames ({mem.video_tokens} tokens of "
                        f"{mem.budget}); allocate more with --ctx or cap it with a compression --policy")
                self._compress()
                compress_ms = (time.perf_counter() - t1) * 1e3
            encode_ms, decode_ms = self.model.decode_frame(encoded, mem.next_pos)
        finally:
            self.model.free_frame(encoded)
        record = FrameRecord(index=self.frames_seen, timestamp=frame.timestamp, pos0=mem.next_pos,
                             n_tokens=encoded.n_tokens, n_pos=encoded.n_pos, nx=encoded.nx, ny=encoded.ny,
                             wrapper_tokens=encoded.n_tokens - encoded.image_tokens)
        mem.records.append(record)
        mem.slots.append(record.index, record.n_tokens, record.pos0, one_position=self.geometry.mrope)
        mem.next_pos += record.n_pos
        mem.frames_since_pass += 1
        self.frames_seen += 1
        timing = IngestTiming(prepare_ms=(t1 - t0) * 1e3, encode_ms=encode_ms, decode_ms=decode_ms,
                              compress_ms=compress_ms)
        return record, timing

    def kv_pass(self) -> _native.KVPass:
        """The native pass over this session's KV cache; its buffers are sized once, for the budget."""
        if self._pass is None:
            mem, geo = self.memory, self.geometry
            self._pass = _native.KVPass(
                self.model.ctx_address, mem.prefix_tokens, geo.n_head_kv, geo.head_dim_k, geo.head_dim_v,
                geo.mrope, geo.rope_type, geo.n_rot, geo.freq_base, geo.freq_scale,
                mem.prefix_tokens + mem.budget, self.model.n_ctx, self.model.config.n_threads,
                list(geo.rope_sections))
            if len(self.state_parts["caches"]) > 1:  # reindex mode moves the sliding layers' cache too
                self._pass.set_sliding_rope(geo.freq_base_swa, 1.0)
        return self._pass

    def _read(self, kv: _native.KVPass) -> None:
        """Point the pass at the cache: llama.cpp's own tensors where it can, else a copy of the state.

        The in-place path relies on cell c holding position c (reindex mode keeps it so); the pass checks
        that every time, and falls back to the copy, which works on any layout, when it does not hold.
        """
        if self._direct is None:
            self._direct = self._direct_supported(kv)
        if self._direct:
            why = kv.read_direct(self.memory.video_tokens)
            if not why:
                return
            log.warning("the KV cache is not laid out as the in-place pass expects (%s); copying it this time", why)
        kv.read()

    def _direct_supported(self, kv: _native.KVPass) -> bool:
        capture = self.model.kv_capture
        if not self.config.direct_pass or self.config.positions != "reindex" or capture is None:
            return False
        why = kv.direct_support(capture)
        if why:
            log.info("the compression pass copies the KV state: %s", why)
        return not why

    def _compress(self) -> None:
        """One pass: |M| video tokens down to |C|, chosen by the policy, carried out by the native pass."""
        mem = self.memory
        p = mem.tokens_per_frame
        keep = int(self.config.keep_fraction * mem.budget) // p * p
        if keep < p:
            raise SettingsError(f"|C| = {self.config.keep_fraction} x {mem.budget} tokens is less than one frame "
                                f"({p} tokens): raise --budget")
        self.policy.check(mem, keep)
        kv = self.kv_pass()
        t0 = time.perf_counter()
        try:
            self._read(kv)
        except RuntimeError as e:  # a KV layout the pass cannot rewrite: say which, keep the memory
            raise ModelError(f"cannot compress this KV cache: {e}") from None
        if kv.n_slots != mem.video_tokens:
            raise ModelError(f"the KV cache holds {kv.n_slots} video cells but {mem.video_tokens} were recorded: "
                             "was the context used by another program?")
        if kv.path == "direct" and self.config.positions == "reindex" and self.policy.native_choice_is_final:
            kv.plan_in_place()  # a native selection moves each layer while it is still in the CPU's cache
        t1 = time.perf_counter()
        try:
            kept = self.policy.select(mem, kv, keep)
        except ValueError as e:  # the native pass refusing its inputs: a bug or a layout we do not know
            raise ModelError(f"the {self.policy.name} policy could not select: {e}") from None
        t2 = time.perf_counter()
        # Cells get compact positions either way; a cell's position only orders it before the question.
        # reindex: right after the prompt, keys re-rotated to match; keep: ending just below the next
        # frame (llama.cpp wants new tokens at the highest position + 1), keys keep their rotation.
        # M-RoPE keep: a frame spans fewer positions than tokens, so there is no room below the next frame;
        # each cell keeps the position of head (0, 0)'s token, which keeps the cells in time order.
        reindex = self.config.positions == "reindex"
        _, _, rot_pos = mem.slots.pass_tables()  # the table itself: apply() reads it before keep() rewrites it
        if not reindex and self.geometry.mrope:
            new_pos = np.ascontiguousarray(rot_pos[0, 0, kept[0, 0]], dtype=np.int32)
        else:
            first = mem.prefix_tokens if reindex else mem.next_pos - keep
            new_pos = np.arange(first, first + keep, dtype=np.int32)
        try:
            kv.apply(kept, new_pos, rot_pos, reindex)
        except (RuntimeError, ValueError) as e:  # refused before anything moved, or restored by the pass
            raise ModelError(str(e)) from None
        t3 = time.perf_counter()
        self.last_pass = {"read_ms": (t1 - t0) * 1e3, "select_ms": (t2 - t1) * 1e3, "apply_ms": (t3 - t2) * 1e3,
                          "state_bytes": kv.state_bytes, "path": kv.path}
        present = set(mem.slots.keep(kept, new_pos if reindex else None).tolist())
        if reindex:
            # M-RoPE: the last slot's row and column reach max(nx, ny) - 1 past its position; text and new
            # frames must start above every position a key holds.
            mem.next_pos = mem.prefix_tokens + keep + (mem.records[-1].n_pos - 1 if self.geometry.mrope else 0)
        mem.records = [r for r in mem.records if r.index in present]
        mem.frames_since_pass = 0
        mem.passes += 1

    # -- questions -----------------------------------------------------------------------------------

    def question_prompt(self, question: str) -> str:
        """The chat after the video: earlier turns (newest first, within the history budget), then this one.

        The video sits at the start of the first user turn, so the template is rendered whole and cut
        at the video's mark; the part before the mark is already in the cache.
        """
        turns = list(self.history)
        n_question = len(self.model.tokenize(question))
        while True:
            messages = [("system", self.config.system_prompt)]
            for q, a in turns:
                messages += [("user", q), ("assistant", a)]
            messages.append(("user", question))
            messages[1] = ("user", VIDEO_MARK + "\n" + messages[1][1])
            opening, _, rest = self.model.chat_prompt(messages, True).partition(VIDEO_MARK)
            if opening != self.opening_text:
                log.warning("the chat template renders its opening differently with history; "
                            "answers may be less accurate")
            if not turns or len(self.model.tokenize(rest)) - n_question <= self.config.history_tokens:
                return rest
            turns.pop(0)  # oldest turn first

    def ask(self, question: str, on_token: Callable[[str], None] | None = None,
            max_tokens: int | None = None) -> Answer:
        """Answer `question` from the video memory, streaming text pieces to `on_token`.

        The question and answer are removed from the cache afterwards: the video memory is unchanged.
        """
        model, mem = self.model, self.memory
        max_tokens = self.config.max_answer_tokens if max_tokens is None else max_tokens
        t0 = time.perf_counter()
        tokens = self.video_close + model.tokenize(self.question_prompt(question))
        room = model.n_ctx - mem.prefix_tokens - mem.video_tokens
        if len(tokens) + max_tokens > room:
            raise ModelError(f"the question needs {len(tokens) + max_tokens} tokens but only {room} are free; "
                             "ask a shorter question or raise --question-room")
        pos_q = mem.next_pos
        sampler = model.make_sampler(self.config.temperature, self.config.seed)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        ttft_ms = 0.0
        n_out = 0
        partial = model.partial_state()
        try:
            model.decode_tokens(tokens, pos_q)
            pos = pos_q + len(tokens)
            t_first = t0
            for n_out in range(1, max_tokens + 1):  # noqa: B007 - n_out is read after the loop
                token = model.sample(sampler)
                if n_out == 1:
                    t_first = time.perf_counter()
                    ttft_ms = (t_first - t0) * 1e3
                if model.is_end_of_generation(token):
                    n_out -= 1
                    break
                piece = utf8.decode(model.token_bytes(token))
                if piece:
                    pieces.append(piece)
                    if on_token:
                        on_token(piece)
                if n_out == max_tokens:
                    break
                model.decode_tokens([token], pos)
                pos += 1
        finally:
            model.free_sampler(sampler)
            # A sliding window moved on and a recurrent state took the question in; neither can be cut back
            # by positions, so they are put back first (then a hybrid memory lets the KV positions go).
            if partial is not None:
                model.restore_partial_state(partial)
            model.remove_positions(pos_q)  # the question and answer leave; the video memory stays
        tail = utf8.decode(b"", final=True)
        if tail:
            pieces.append(tail)
            if on_token:
                on_token(tail)
        t_end = time.perf_counter()
        text = "".join(pieces).strip()
        self.history.append((question, text))
        gen_s = t_end - t_first
        return Answer(question=question, text=text, ttft_ms=ttft_ms, total_ms=(t_end - t0) * 1e3,
                      n_tokens=n_out, tokens_per_s=(n_out - 1) / gen_s if n_out > 1 and gen_s > 0 else 0.0,
                      frames=self.frames_seen, video_tokens=mem.video_tokens)

    # -- status --------------------------------------------------------------------------------------

    def status(self) -> Status:
        now, peak = rss_mb()
        elapsed = time.perf_counter() - self._started
        mem = self.memory
        return Status(frames=self.frames_seen, frames_in_memory=len(mem.records), video_tokens=mem.video_tokens,
                      kv_bytes=self.model.state_size(), rss_mb=round(now, 1), peak_rss_mb=round(peak, 1),
                      frames_per_s=round(self.frames_seen / elapsed, 3) if elapsed > 0 else 0.0,
                      capacity=mem.capacity, budget=mem.budget, passes=mem.passes, next_pos=mem.next_pos)
