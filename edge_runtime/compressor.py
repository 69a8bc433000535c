"""The compression pass, owned end to end: one object, one call a pass, one order.

A `Compressor` is made once per memory from `CompressorParams` (as llama.cpp's *_params structs: one struct
with defaults, no long argument lists). `compress(memory)` asks the policy what to keep, has the native
pass (native/kv_pass.cpp) read the cache, choose, re-rotate and write back in a single call, then records
the result in the memory's bookkeeping (`VideoMemory.apply_pass`). Nobody else calls the native pass.

The native pass takes one of three routes (`PassReport.path`), chosen at the first pass:
- "direct": in place on a CPU cache in reindex mode, llama.cpp's K and V tensors read and rewritten by the
  CPU kernels (the layout is checked at every pass);
- "graph": in place on a cache that lives on another ggml backend (a CUDA, Vulkan or Metal GPU), the
  O(KV bytes) work done by ggml graphs on that backend, only the scores coming back to the host;
- "portable": everything else (keep mode, M-RoPE, sliding-window and hybrid memories, a backend that lacks
  an op): the sequence's state copied out and back through two host buffers sized once for the budget.
Whatever fails, the memory is left as it was, with a one-line reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime import _native
from edge_runtime.context import Context
from edge_runtime.errors import ModelError, SettingsError
from edge_runtime.families import KVGeometry
from edge_runtime.memory import VideoMemory
from edge_runtime.policies import Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressorParams:
    """What a pass needs to know of the model and the memory, fixed for the memory's life."""

    geometry: KVGeometry  # of the cache the pass compresses (its first KV cache)
    n_prefix: int  # cells of the prompt before the video: never touched
    budget: int  # |M|
    n_ctx: int  # the context's cells: RoPE tables cover every position below it
    n_threads: int
    keep_fraction: float = 0.75  # |C| = 0.75 |M| (the paper's default), rounded down to whole frames
    positions: str = "reindex"  # reindex: compact positions, keys re-rotated; keep: original rotations
    in_place: bool = True  # rewrite llama.cpp's KV tensors in place when the cache allows it
    graph_on_cpu: bool = False  # a CPU cache too takes the ggml-graph route (measurements), not the CPU kernels
    sliding_cache: bool = False  # a sliding-window cache (Gemma 3) that moves with the sequence in reindex mode


@dataclass(frozen=True)
class PassReport:
    """What the last pass did, and what it cost."""

    path: str  # "direct" (in place, CPU kernels), "graph" (in place, ggml graphs on the cache's backend: a GPU)
    #            or "portable" (the state copied out and back)
    read_ms: float
    select_ms: float
    apply_ms: float
    state_bytes: int  # of the sequence's state when the pass read it
    kept: int  # |C|
    backend: str = ""  # the graph route's ggml backend (CUDA0, Vulkan0, Metal, CPU), "" for the other paths
    score_ms: float = 0.0  # of select_ms, the graph route's scoring on that backend (0 on the other paths)


class Compressor:
    """The compression pass of one memory: policy -> native pass -> bookkeeping."""

    def __init__(self, context: Context, params: CompressorParams, policy: Policy) -> None:
        self.params = params
        self.policy = policy
        geo = params.geometry
        native = _native.PassParams()
        native.seq_id, native.n_prefix = context.seq_id, params.n_prefix
        native.n_head_kv, native.head_dim_k, native.head_dim_v = geo.n_head_kv, geo.head_dim_k, geo.head_dim_v
        native.rope_type, native.n_rot = geo.rope_type, geo.n_rot
        native.freq_base, native.freq_scale = geo.freq_base, geo.freq_scale
        native.rope_sections, native.mrope = list(geo.rope_sections), geo.mrope
        native.sliding_freq_base = geo.freq_base_swa if params.sliding_cache else 0.0
        native.max_cells, native.max_position = params.n_prefix + params.budget, params.n_ctx
        native.n_threads, native.in_place = params.n_threads, params.in_place
        native.graph_on_cpu = params.graph_on_cpu
        self._context = context
        self._native_params = native
        self._pass: _native.KVPass | None = None  # made at the first pass; its buffers are sized for the budget
        # Diagnostics (tests, scripts/retention.py): called with the native pass once it has read the cache,
        # and with the pass's result once the memory recorded it.
        self.on_read: list[Callable[[_native.KVPass, VideoMemory, int], None]] = []
        self.on_pass: list[Callable[[_native.KVPass, VideoMemory, dict], None]] = []
        self.last: PassReport | None = None

    @property
    def native(self) -> _native.KVPass:
        """The native pass, made on first use (at the first pass: the capture has seen a decode by then)."""
        if self._pass is None:
            self._pass = _native.KVPass(self._context.ctx_address, self._native_params, self._context.kv_capture)
        return self._pass

    def keep_tokens(self, memory: VideoMemory) -> int:
        """|C|: keep_fraction x |M|, rounded down to whole frames."""
        p = memory.tokens_per_frame
        keep = int(self.params.keep_fraction * memory.budget) // p * p
        if keep < p:
            raise SettingsError(f"|C| = {self.params.keep_fraction} x {memory.budget} tokens is less than one frame "
                                f"({p} tokens): raise --budget")
        return keep

    def compress(self, memory: VideoMemory) -> PassReport:
        """One pass: |M| video tokens down to |C|, chosen by the policy, carried out by the native pass."""
        keep = self.keep_tokens(memory)
        self.policy.check(memory, keep)
        choice = self.policy.choose(memory, keep)
        kv = self.native
        if self.last is None and self.params.in_place and self.params.positions == "reindex":
            why = kv.in_place_refusal()  # said once, at the first pass (the capture has seen a decode by then)
            if why:
                log.info("the compression pass copies the KV state: %s", why)
        frame, patch, rot_pos = memory.slots.pass_tables()
        reindex = self.params.positions == "reindex"
        on_read = (lambda: [f(kv, memory, keep) for f in self.on_read]) if self.on_read else None
        try:
            result = kv.compress(frame, patch, rot_pos, memory.video_tokens, choice, reindex, memory.next_pos,
                                 on_read=on_read)
        except ValueError as e:  # refused before anything moved: a bug or a layout we do not know
            raise ModelError(f"the {self.policy.name} policy could not select: {e}") from None
        except RuntimeError as e:  # a layout the pass cannot rewrite, or a write-back llama.cpp refused (restored)
            raise ModelError(str(e)) from None
        if result["fallback"]:
            log.warning("the KV cache is not laid out as the in-place pass expects (%s); copied it this time",
                        result["fallback"])
        memory.apply_pass(result["kept"], result["new_pos"], reindex)
        self.last = PassReport(path=result["path"], read_ms=result["read_ms"], select_ms=result["select_ms"],
                               apply_ms=result["apply_ms"], state_bytes=result["state_bytes"], kept=keep,
                               backend=result["backend"], score_ms=result["score_ms"])
        for f in self.on_pass:
            f(kv, memory, result)
        return self.last
