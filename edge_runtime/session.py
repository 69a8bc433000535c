"""The streaming API: insert a frame, ask a question, read the status.

A `Session` is one video memory on a loaded model: its own llama.cpp context (edge_runtime/context.py), its
bookkeeping (edge_runtime/memory.py), its budget and its compression (edge_runtime/compressor.py). Several
sessions can share one model. The memory's sequence holds, in order: the chat template's opening (system
prompt and the start of the user turn), then every frame the policy has kept. A question is decoded on top,
answered, and removed again, so the video memory after a question is exactly what it was before. When the
video tokens would pass the budget |M|, one compression pass shrinks them to |C|.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime import _native
from edge_runtime.compressor import Compressor, CompressorParams
from edge_runtime.context import Context
from edge_runtime.errors import MemoryFull, ModelError, QuestionTooLong, SettingsError
from edge_runtime.families import KVGeometry, memory_support
from edge_runtime.memory import FrameRecord, SlotTable, VideoMemory
from edge_runtime.model import VisionLanguageModel
from edge_runtime.opencv import cv2
from edge_runtime.policies import FullCache, Policy
from edge_runtime.sources import Frame

log = logging.getLogger(__name__)

VIDEO_MARK = "<__edge_runtime_video__>"  # stands for the video in the rendered chat template
FULL_CACHE_CTX = 8192  # the full cache's context when none is given: SmolLM2's trained context
PREFIX_ROOM = 512  # cells set aside for the system prompt when a budget sizes the context


@dataclass
class SessionConfig:
    system_prompt: str = (
        "You are watching a live video stream, one frame at a time. "
        "Answer questions about what you have seen briefly and precisely."
    )
    # KV cells, allocated once. None: sized for the budget (budget + question room + PREFIX_ROOM), or
    # FULL_CACHE_CTX for the full cache.
    n_ctx: int | None = None
    question_room: int = 512  # KV cells kept free for a question, its history and the answer
    max_answer_tokens: int = 128
    history_tokens: int = 256  # earlier turns given back as text, newest first, up to this many tokens
    temperature: float = 0.0  # greedy: the same memory and question give the same answer
    seed: int = 0
    budget: int | None = None  # |M| video tokens; None: all the context holds (the full cache's limit)
    keep_fraction: float = CompressorParams.keep_fraction
    positions: str = CompressorParams.positions
    direct_pass: bool = CompressorParams.in_place  # compress llama.cpp's KV tensors in place when it can
    graph_on_cpu: bool = CompressorParams.graph_on_cpu  # a CPU cache too by ggml graphs (tests, measurements)

    def context_size(self) -> int:
        if self.n_ctx is not None:
            return self.n_ctx
        return self.budget + self.question_room + PREFIX_ROOM if self.budget else FULL_CACHE_CTX


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
    kv_bytes: int  # bytes of the sequence's state (cells + K + V) as llama.cpp serialises it
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
    """One video memory on a loaded model. Not thread-safe: call it from one thread."""

    def __init__(self, model: VisionLanguageModel, config: SessionConfig | None = None,
                 policy: Policy | None = None) -> None:
        self.model = model
        self.config = cfg = config or SessionConfig()
        self.policy = policy or FullCache()
        self.history: list[tuple[str, str]] = []
        self.frames_seen = 0
        self._started = time.perf_counter()

        opening = model.chat_prompt([("system", cfg.system_prompt), ("user", VIDEO_MARK)], False)
        self.opening_text = opening.split(VIDEO_MARK)[0]  # system prompt and the start of the user turn
        # Families that wrap the whole video once (Qwen: <|vision_start|> ... <|vision_end|>): the opening
        # wrapper ends the prefix, the closing one starts every question.
        video_open, self.video_close = model.video_wrapper()
        prefix = model.tokenize(self.opening_text, add_special=True) + video_open
        self.context = Context(model, cfg.context_size())
        try:
            capacity = self.context.n_ctx - len(prefix) - cfg.question_room
            if capacity <= 0:
                raise ModelError(f"a context of {self.context.n_ctx} tokens leaves no room for video after the system "
                                 f"prompt ({len(prefix)}) and the question room ({cfg.question_room})")
            budget = self._check_settings(capacity, len(prefix))
            geometry = model.kv_geometry()
            self.support = memory_support(model.family, geometry, self.context.layout["n_caches"],
                                          self.context.layout["recurrent"])
            self.support.check(self.policy.compresses, cfg.positions)
            self.context.decode_tokens(prefix, 0)
            # What the state holds besides the one KV cache every model has (the sliding-window cache of Gemma 3,
            # the recurrent state of LFM2): the pass carries it, questions save and restore it.
            self.state_parts = _native.state_parts(self.context.ctx_address, geometry.mrope,
                                                   seq_id=self.context.seq_id)
            self.geometry = compressed_cache_geometry(geometry, self.state_parts)
        except BaseException:
            self.context.close()
            raise
        slots = SlotTable(self.geometry.n_layer, self.geometry.n_head_kv, capacity)
        self.memory = VideoMemory(capacity=capacity, budget=budget, prefix_tokens=len(prefix),
                                  next_pos=len(prefix), slots=slots, mrope=self.geometry.mrope)
        self.compressor = Compressor(self.context, CompressorParams(
            geometry=self.geometry, n_prefix=len(prefix), budget=budget, n_ctx=self.context.n_ctx,
            n_threads=model.config.n_threads, keep_fraction=cfg.keep_fraction, positions=cfg.positions,
            in_place=cfg.direct_pass, graph_on_cpu=cfg.graph_on_cpu,
            sliding_cache=len(self.state_parts["caches"]) > 1), self.policy)

    def _check_settings(self, capacity: int, n_prefix: int) -> int:
        cfg = self.config
        if cfg.budget is None:
            return capacity
        if cfg.budget > capacity:
            raise SettingsError(f"a budget of {cfg.budget} video tokens needs a context of at least "
                                f"{cfg.budget + n_prefix + cfg.question_room} tokens (--ctx), not {self.context.n_ctx}")
        if not 0.0 < cfg.keep_fraction < 1.0:
            raise SettingsError(f"|C| must be smaller than |M|: the keep fraction must be in (0, 1), not "
                                f"{cfg.keep_fraction}")
        if cfg.positions not in ("keep", "reindex"):
            raise SettingsError(f"positions must be keep or reindex, not {cfg.positions}")
        return cfg.budget

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
                self.compressor.compress(mem)
                compress_ms = (time.perf_counter() - t1) * 1e3
            encode_ms, decode_ms = self.context.decode_frame(encoded, mem.next_pos)
        finally:
            self.model.free_frame(encoded)
        record = FrameRecord(index=self.frames_seen, timestamp=frame.timestamp, pos0=mem.next_pos,
                             n_tokens=encoded.n_tokens, n_pos=encoded.n_pos, nx=encoded.nx, ny=encoded.ny,
                             wrapper_tokens=encoded.n_tokens - encoded.image_tokens)
        mem.append(record)
        self.frames_seen += 1
        return record, IngestTiming(prepare_ms=(t1 - t0) * 1e3, encode_ms=encode_ms, decode_ms=decode_ms,
                                    compress_ms=compress_ms)

    # -- questions -----------------------------------------------------------------------------------

    def question_prompt(self, question: str, history: list[tuple[str, str]] | None = None) -> str:
        """The chat after the video: earlier turns (the session's, or `history`; newest first, within the
        history budget), then this one.

        The video sits at the start of the first user turn, so the template is rendered whole and cut
        at the video's mark; the part before the mark is already in the cache.
        """
        turns = list(self.history if history is None else history)
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
            max_tokens: int | None = None, history: list[tuple[str, str]] | None = None) -> Answer:
        """Answer `question` from the video memory, streaming text pieces to `on_token`.

        The earlier turns are the session's own conversation, which the answer joins; or, given `history`
        (an API client's conversation), those, and the session's conversation is left as it was. The question
        and answer leave the cache afterwards (Context.generate): the video memory is unchanged. An exception
        raised by on_token (a client that went away) ends the answer there, the cache cleaned up all the same.
        """
        mem, cfg = self.memory, self.config
        max_tokens = cfg.max_answer_tokens if max_tokens is None else max_tokens
        t0 = time.perf_counter()
        tokens = self.video_close + self.model.tokenize(self.question_prompt(question, history))
        room = self.context.n_ctx - mem.prefix_tokens - mem.video_tokens
        if len(tokens) + max_tokens > room:
            raise QuestionTooLong(f"the question needs {len(tokens) + max_tokens} tokens but only {room} are free; "
                             "ask a shorter question or raise --question-room")
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces: list[str] = []
        n_out = 0
        t_first = None
        for token in self.context.generate(tokens, mem.next_pos, max_tokens, cfg.temperature, cfg.seed):
            t_first = t_first or time.perf_counter()
            n_out += 1
            pieces.append(utf8.decode(self.model.token_bytes(token)))
            if pieces[-1] and on_token:
                on_token(pieces[-1])
        pieces.append(utf8.decode(b"", final=True))
        if pieces[-1] and on_token:
            on_token(pieces[-1])
        t_end = time.perf_counter()
        t_first = t_first or t_end
        text = "".join(pieces).strip()
        if history is None:
            self.history.append((question, text))
        gen_s = t_end - t_first
        return Answer(question=question, text=text, ttft_ms=(t_first - t0) * 1e3, total_ms=(t_end - t0) * 1e3,
                      n_tokens=n_out, tokens_per_s=(n_out - 1) / gen_s if n_out > 1 and gen_s > 0 else 0.0,
                      frames=self.frames_seen, video_tokens=mem.video_tokens)

    # -- status --------------------------------------------------------------------------------------

    def status(self) -> Status:
        now, peak = rss_mb()
        elapsed = time.perf_counter() - self._started
        mem = self.memory
        return Status(frames=self.frames_seen, frames_in_memory=len(mem.records), video_tokens=mem.video_tokens,
                      kv_bytes=self.context.state_size(), rss_mb=round(now, 1), peak_rss_mb=round(peak, 1),
                      frames_per_s=round(self.frames_seen / elapsed, 3) if elapsed > 0 else 0.0,
                      capacity=mem.capacity, budget=mem.budget, passes=mem.passes, next_pos=mem.next_pos)

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Free this memory's context (the model stays loaded for other sessions)."""
        self.context.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
