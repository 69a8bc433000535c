"""Pin what the tiny GGUF fixtures from scripts/make_fixtures.py give the real llama.cpp.

Other tests rely on these facts (a 64-wide llama that loads and gives finite logits, 16 image tokens
per frame, a mismatched projector that mtmd refuses cleanly), so a llama.cpp upgrade that breaks one
of them should fail here first, with a clear name.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
mtmd_cpp = pytest.importorskip("llama_cpp.mtmd_cpp")

N_THREADS = 2


@pytest.fixture(scope="module")
def model(fixtures: dict[str, Path]) -> Iterator[int]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    handle = llama_cpp.llama_model_load_from_file(str(fixtures["model"]).encode(), params)
    assert handle, "llama_model_load_from_file returned NULL for the tiny model"
    yield handle
    llama_cpp.llama_model_free(handle)


@pytest.fixture()
def context(model: int) -> Iterator[int]:
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = 256
    params.n_batch = 256
    params.n_ubatch = 256
    params.n_threads = N_THREADS
    params.n_threads_batch = N_THREADS
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    yield ctx
    llama_cpp.llama_free(ctx)


def mtmd_params() -> mtmd_cpp.mtmd_context_params:
    params = mtmd_cpp.mtmd_context_params_default()
    params.use_gpu = False
    params.n_threads = N_THREADS
    params.print_timings = False
    return params


@pytest.fixture(scope="module")
def mtmd(model: int, fixtures: dict[str, Path]) -> Iterator[int]:
    handle = mtmd_cpp.mtmd_init_from_file(str(fixtures["mmproj"]).encode(), model, mtmd_params())
    assert handle, "mtmd_init_from_file returned NULL for the matching projector"
    yield handle
    mtmd_cpp.mtmd_free(handle)


def tokenize_frame(mtmd: int, rgb: np.ndarray) -> int:
    """One frame (H x W x 3 uint8 RGB) as mtmd input chunks; the caller frees them."""
    height, width, _ = rgb.shape
    data = np.ascontiguousarray(rgb, dtype=np.uint8)
    bitmap = mtmd_cpp.mtmd_bitmap_init(width, height, data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    assert bitmap
    try:
        marker = mtmd_cpp.mtmd_default_marker()
        text = mtmd_cpp.mtmd_input_text()
        text.text = marker
        text.text_len = len(marker)
        text.add_special = False
        text.parse_special = True
        chunks = mtmd_cpp.mtmd_input_chunks_init()
        bitmaps = (mtmd_cpp.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd_cpp.mtmd_tokenize(mtmd, chunks, ctypes.byref(text), bitmaps, 1) == 0
        return chunks
    finally:
        mtmd_cpp.mtmd_bitmap_free(bitmap)  # mtmd_tokenize copied the pixels


def chunk_summary(chunks: int) -> list[tuple[int, int]]:
    """(chunk type, token count) for each chunk."""
    out = []
    for i in range(mtmd_cpp.mtmd_input_chunks_size(chunks)):
        chunk = mtmd_cpp.mtmd_input_chunks_get(chunks, i)
        out.append((mtmd_cpp.mtmd_input_chunk_get_type(chunk), mtmd_cpp.mtmd_input_chunk_get_n_tokens(chunk)))
    return out


def last_logits(ctx: int, n_vocab: int) -> np.ndarray:
    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()


def random_frame(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def test_text_model_shape_and_tokenizer(model: int) -> None:
    assert llama_cpp.llama_model_n_embd(model) == 64
    assert llama_cpp.llama_model_n_layer(model) == 2
    assert llama_cpp.llama_model_n_head(model) == 4
    assert llama_cpp.llama_model_n_head_kv(model) == 2
    assert llama_cpp.llama_model_n_ctx_train(model) == 1024
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert llama_cpp.llama_vocab_n_tokens(vocab) == 49152  # SmolLM2's tokenizer, copied whole
    assert llama_cpp.llama_vocab_bos(vocab) == 1
    assert llama_cpp.llama_vocab_eos(vocab) == 2
    template = llama_cpp.llama_model_chat_template(model, None)
    assert template is not None and b"<|im_start|>" in template


def test_text_logits_are_finite(model: int, context: int) -> None:
    vocab = llama_cpp.llama_model_get_vocab(model)
    text = b"<|im_start|>user\nWhat is in the video?<|im_end|>\n"
    tokens = (llama_cpp.llama_token * 64)()
    n = llama_cpp.llama_tokenize(vocab, text, len(text), tokens, 64, False, True)
    assert 0 < n < 64
    assert tokens[0] == 1  # <|im_start|> parsed as the special token, not as text
    assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(tokens, n)) == 0
    logits = last_logits(context, llama_cpp.llama_vocab_n_tokens(vocab))
    assert np.isfinite(logits).all()
    assert logits.std() > 0  # random weights, but not a degenerate constant head


def test_frame_is_16_image_tokens_into_the_kv_cache(model: int, context: int, mtmd: int) -> None:
    memory = llama_cpp.llama_get_memory(context)
    n_past = 0
    for i in range(2):
        chunks = tokenize_frame(mtmd, random_frame(i))
        try:
            assert chunk_summary(chunks) == [(mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE, 16)]
            new_n_past = llama_cpp.llama_pos(0)
            rc = mtmd_cpp.mtmd_helper_eval_chunks(
                mtmd, context, chunks, n_past, 0, 256, True, ctypes.byref(new_n_past)
            )
            assert rc == 0
        finally:
            mtmd_cpp.mtmd_input_chunks_free(chunks)
        assert new_n_past.value == n_past + 16
        n_past = new_n_past.value
        assert llama_cpp.llama_memory_seq_pos_min(memory, 0) == 0
        assert llama_cpp.llama_memory_seq_pos_max(memory, 0) == n_past - 1

    # Decoding image embeddings produces no logits (logits_last only concerns text chunks), so feed
    # one text token: its logits show the cached image rows are finite too.
    token = (llama_cpp.llama_token * 1)(1)
    batch = llama_cpp.llama_batch_get_one(token, 1)
    assert llama_cpp.llama_decode(context, batch) == 0
    vocab = llama_cpp.llama_model_get_vocab(model)
    assert np.isfinite(last_logits(context, llama_cpp.llama_vocab_n_tokens(vocab))).all()


def test_any_frame_size_is_resized_to_16_tokens(mtmd: int) -> None:
    # The mlp projector's preprocessor resizes every frame to image_size x image_size.
    chunks = tokenize_frame(mtmd, random_frame(0, height=48, width=80))
    try:
        assert chunk_summary(chunks) == [(mtmd_cpp.MTMD_INPUT_CHUNK_TYPE_IMAGE, 16)]
    finally:
        mtmd_cpp.mtmd_input_chunks_free(chunks)


def test_mismatched_mmproj_is_refused_with_null(model: int, fixtures: dict[str, Path]) -> None:
    # mtmd logs "mismatch between text model (n_embd = 64) and mmproj (n_embd = 32)" and returns
    # NULL: no abort, so the runtime can turn it into its own error.
    handle = mtmd_cpp.mtmd_init_from_file(str(fixtures["mmproj_mismatched"]).encode(), model, mtmd_params())
    assert handle is None


def test_missing_model_file_is_null(tmp_path: Path) -> None:
    params = llama_cpp.llama_model_default_params()
    assert llama_cpp.llama_model_load_from_file(str(tmp_path / "missing.gguf").encode(), params) is None


def test_same_seed_same_bytes(
    make_fixtures_module: ModuleType, fixtures: dict[str, Path], tmp_path: Path
) -> None:
    again = make_fixtures_module.make_fixtures(tmp_path / "again", seed=0)
    assert again.keys() == fixtures.keys() == {"model", "mmproj", "mmproj_mismatched", "smollm2_mmproj"}
    for key, path in fixtures.items():
        assert again[key].read_bytes() == path.read_bytes(), key
    other = make_fixtures_module.make_fixtures(tmp_path / "other", seed=1)
    assert other["mmproj"].read_bytes() != fixtures["mmproj"].read_bytes()
