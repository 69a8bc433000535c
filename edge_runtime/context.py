"""One memory's llama.cpp context: its KV cache, the sequence that holds the video, and the calls on it.

A `Context` is made from a loaded `VisionLanguageModel` (edge_runtime/model.py) and belongs to one memory:
several contexts can share one model, each with its own cache. The memory lives in the context's sequence
`seq_id`; every call here names it. An evaluation callback (public API) lets the native pass find
llama.cpp's own K and V tensors during a probe decode when the context is made (native/capture.hpp KVCapture);
then it is taken back, so that no frame pays for it, and the probe leaves the cache empty.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections.abc import Iterator

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd
import numpy as np

from edge_runtime._native import KVCapture, state_layout
from edge_runtime.errors import ModelError
from edge_runtime.model import CACHE_TYPES, EncodedFrame, VisionLanguageModel
from edge_runtime.native_log import NATIVE_LOG

log = logging.getLogger(__name__)

# llama.h: only the parts of the state that are not a plain KV cache (a sliding-window cache, a recurrent state)
STATE_PARTIAL_ONLY = 1
_NO_POST_DECODE = mtmd.mtmd_helper_post_decode_callback()  # a NULL callback: ctypes refuses None


def context_params(model: VisionLanguageModel, n_ctx: int, seq_id: int = 0) -> llama_cpp.llama_context_params:
    """llama.cpp's default context parameters with this runtime's settings (no evaluation callback): what a
    Context is made with, and what scripts/benchmark_ingest.py makes a plain context with."""
    config = model.config
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx = n_ctx
    cparams.n_batch = cparams.n_ubatch = config.n_batch
    cparams.n_seq_max = seq_id + 1
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
    cparams.type_k = cparams.type_v = CACHE_TYPES[config.cache_type]
    return cparams


class Context:
    """A llama context of n_ctx cells, allocated once, for the memory in sequence seq_id."""

    def __init__(self, model: VisionLanguageModel, n_ctx: int, seq_id: int = 0) -> None:
        self.model = model
        self.seq_id = seq_id
        self.ctx = None
        self._batch = None
        config = model.config
        NATIVE_LOG.clear()
        cparams = context_params(model, n_ctx, seq_id)
        # The in-place compression pass finds llama.cpp's K and V tensors through the evaluation callback
        # (public API) during the probe decode (_find_cache); the capture must live as long as the context.
        self.kv_capture = KVCapture(llama_cpp.llama_model_n_layer(model.model))
        cparams.cb_eval = ctypes.cast(ctypes.c_void_p(self.kv_capture.callback),
                                      llama_cpp.ggml_backend_sched_eval_callback)
        cparams.cb_eval_user_data = ctypes.c_void_p(self.kv_capture.user_data)
        self.ctx = llama_cpp.llama_init_from_model(model.model, cparams)
        if not self.ctx:
            raise ModelError(f"llama.cpp could not create a context of {n_ctx} tokens: {NATIVE_LOG.first_error()}")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        model.contexts.add(self)
        if model.lora is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(model.lora)
            scales = (ctypes.c_float * 1)(1.0)
            if llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, scales) != 0:
                self.close()
                raise ModelError(f"llama.cpp could not apply the LoRA adapter {config.lora_path}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        # A sliding-window cache or a recurrent state beside the KV cache: parts of the memory that removing
        # positions cannot put back (see partial_state).
        self.layout = state_layout(self.ctx_address, model.uses_mrope)
        self.has_partial_state = self.layout["n_caches"] > 1 or self.layout["recurrent"]
        self._batch = llama_cpp.llama_batch_init(config.n_batch, 0, 1)
        self._find_cache()

    def _find_cache(self) -> None:
        """One decode shows the capture llama.cpp's K and V tensors; then the callback is taken back, since a
        set callback costs every later decode (+33 % a frame on CUDA, native/capture.hpp), and the cache is
        emptied again (a recurrent state too)."""
        token = max(llama_cpp.llama_vocab_bos(self.model.vocab), 0)
        self.decode_tokens([token, token], 0)
        if self.kv_capture.detach(self.ctx_address):
            # llama.cpp hands the scheduler the context's callback when it builds a graph, and it builds one
            # for a batch of another shape (src/llama-context.cpp:1412-1428): one token after two.
            self.decode_tokens([token], 2)
        else:
            log.debug("the evaluation callback could not be taken back: every decode pays for it")
        llama_cpp.llama_memory_clear(self.memory, True)

    # -- the KV cache --------------------------------------------------------------------------------

    def remove_positions(self, pos0: int, pos1: int = -1) -> None:
        """Drop the cells of this memory's sequence with positions in [pos0, pos1) (pos1 = -1: to the end)."""
        if not llama_cpp.llama_memory_seq_rm(self.memory, self.seq_id, pos0, pos1):
            raise ModelError(f"llama.cpp refused to remove positions [{pos0}, {pos1})")

    def max_position(self) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, self.seq_id)

    def state_bytes(self) -> bytes:
        """The sequence's KV state as llama.cpp serialises it (cells, K and V)."""
        size = llama_cpp.llama_state_seq_get_size(self.ctx, self.seq_id)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data(self.ctx, buf, size, self.seq_id)
        return bytes(memoryview(buf)[:n])  # one copy (slicing the ctypes array would make a list of ints)

    def set_state_bytes(self, blob: bytes | bytearray | memoryview) -> None:
        """Replace the sequence's state with one state_bytes() gave (this context's model and cache types).

        A writable buffer (bytearray, a memoryview of one) is read where it is; bytes are copied once."""
        blob = memoryview(blob)
        buf = (ctypes.c_uint8 * blob.nbytes)
        buf = buf.from_buffer_copy(blob) if blob.readonly else buf.from_buffer(blob)
        NATIVE_LOG.clear()
        n = llama_cpp.llama_state_seq_set_data(self.ctx, buf, blob.nbytes, self.seq_id)
        if n != blob.nbytes:
            raise ModelError(f"llama.cpp refused the saved KV state ({blob.nbytes} bytes): {NATIVE_LOG.first_error()}")

    def partial_state(self) -> bytes | None:
        """The parts of the sequence's state that removing positions cannot put back: a sliding-window cache
        (its window moves on and reuses cells) and a recurrent state (it cannot be rolled back). None for a
        plain KV cache (llama.cpp would give the whole cache)."""
        if not self.has_partial_state:
            return None
        size = llama_cpp.llama_state_seq_get_size_ext(self.ctx, self.seq_id, STATE_PARTIAL_ONLY)
        buf = (ctypes.c_uint8 * size)()
        n = llama_cpp.llama_state_seq_get_data_ext(self.ctx, buf, size, self.seq_id, STATE_PARTIAL_ONLY)
        return bytes(buf[:n])

    def restore_partial_state(self, blob: bytes) -> None:
        """Put back what partial_state() returned (the rest of the state is left as it is)."""
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        n = llama_cpp.llama_state_seq_set_data_ext(self.ctx, buf, len(blob), self.seq_id, STATE_PARTIAL_ONLY)
        if n != len(blob):
            raise ModelError(f"llama.cpp could not restore the sliding-window or recurrent state: "
                             f"{NATIVE_LOG.first_error(latest=True)}")

    @property
    def ctx_address(self) -> int:
        """The llama_context pointer as an integer, for the native pass."""
        return ctypes.cast(self.ctx, ctypes.c_void_p).value or 0

    def state_size(self) -> int:
        return llama_cpp.llama_state_seq_get_size(self.ctx, self.seq_id)

    # -- decoding ------------------------------------------------------------------------------------

    def decode_tokens(self, tokens: list[int], pos0: int) -> None:
        """Decode `tokens` into sequence 0 at positions pos0.., keeping logits of the last one only."""
        b = self._batch
        step = self.model.config.n_batch
        for start in range(0, len(tokens), step):
            part = tokens[start : start + step]
            b.n_tokens = len(part)
            for i, tok in enumerate(part):
                b.token[i] = tok
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = self.seq_id
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
        n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        return np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()

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
            if mtmd.mtmd_encode_chunk(self.model.mtmd_ctx, chunk) != 0:
                raise ModelError(f"the projector failed on a frame: {NATIVE_LOG.first_error(latest=True)}")
            embd = mtmd.mtmd_get_output_embd(self.model.mtmd_ctx)
            t1 = time.perf_counter()
            new_pos = llama_cpp.llama_pos(0)
            rc = mtmd.mtmd_helper_decode_image_chunk(
                self.model.mtmd_ctx, self.ctx, chunk, embd, pos, self.seq_id, self.model.config.n_batch,
                ctypes.byref(new_pos), _NO_POST_DECODE, None,
            )
            t2 = time.perf_counter()
            if rc != 0:
                raise ModelError(f"decoding a frame failed ({rc}): {NATIVE_LOG.first_error(latest=True)}")
            encode_ms += (t1 - t0) * 1e3
            decode_ms += (t2 - t1) * 1e3
            pos = new_pos.value
        return encode_ms, decode_ms

    # -- generation ----------------------------------------------------------------------------------

    def generate(self, tokens: list[int], pos0: int, max_tokens: int, temperature: float = 0.0,
                 seed: int = 0) -> Iterator[int]:
        """Decode `tokens` at pos0.. on top of the memory and yield the tokens sampled after them, up to
        max_tokens, stopping before an end-of-generation token.

        Whatever was decoded leaves again when the iterator ends (or is closed): positions from pos0 on are
        removed, and a sliding window or recurrent state, which removing positions cannot put back, is
        restored first. The memory below pos0 is left exactly as it was.
        """
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if temperature <= 0:  # greedy: the same memory and question give the same answer
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(seed))
        partial = self.partial_state()
        try:
            self.decode_tokens(tokens, pos0)
            pos = pos0 + len(tokens)
            for n in range(1, max_tokens + 1):
                token = llama_cpp.llama_sampler_sample(chain, self.ctx, -1)
                if self.model.is_end_of_generation(token):
                    return
                yield token
                if n == max_tokens:
                    return
                self.decode_tokens([token], pos)
                pos += 1
        finally:
            llama_cpp.llama_sampler_free(chain)
            # A sliding window moved on and a recurrent state took the tokens in; neither can be cut back by
            # positions, so they are put back first (then a hybrid memory lets the KV positions go).
            if partial is not None:
                self.restore_partial_state(partial)
            self.remove_positions(pos0)

    # -- lifetime ------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None

    def __enter__(self) -> Context:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
