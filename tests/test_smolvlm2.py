"""SmolVLM2 (idefics3) on the real llama.cpp: one view a frame out of mtmd's tiles, then the invariants of
the compression pass that tests/test_compression.py and tests/test_direct_pass.py pin for the tiny llama.

The tiny pair comes from scripts/make_fixtures_smolvlm2.py: SmolVLM2's text model is a llama, so the KV
cache is the llama one; what differs is how mtmd turns a frame into images.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import ModuleType

import llama_cpp.mtmd_cpp as mtmd
import numpy as np
import pytest
import test_compression
import test_direct_pass
from wallclock import wall_s

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource
from scripts import make_fixtures_smolvlm2

VIEW_TOKENS = 16  # (128 px / 16 px patches / pixel shuffle 2)^2: a 4 x 4 grid
FOUR_BY_THREE = (320, 240)  # the synthetic frames' size here: 4:3, which mtmd tiles


@pytest.fixture(scope="session")
def smol_module() -> ModuleType:
    return make_fixtures_smolvlm2


@pytest.fixture(scope="session")
def smol(smol_module: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The pair under the names the shared tests of test_compression and test_direct_pass look up."""
    out = tmp_path_factory.mktemp("smolvlm2")
    files = smol_module.make_fixtures(out)
    named = {"llama-2x2": files["model"], "mmproj-4x4": files["mmproj"]}
    for n_layer, n_head_kv in [(1, 1), (3, 4)]:
        path = out / f"tiny-smolvlm2-{n_layer}x{n_head_kv}.gguf"
        smol_module.write_text_model(path, 0, n_layer=n_layer, n_head_kv=n_head_kv)
        named[f"llama-{n_layer}x{n_head_kv}"] = path
    return named


def test_mtmd_tiles_a_frame_and_the_runtime_decodes_the_global_view(smol: dict[str, Path]) -> None:
    """Pins mtmd's idefics3 layout: tiles (each after <fake_token_around_image><row_Y_col_X>), then the global
    view after "\\n\\n<fake_token_around_image><global-img>" and before <fake_token_around_image>. The model
    caps an image at one view's tokens (image_max_tokens), so mtmd cuts one tile, not 2 x 2 at 256 px."""
    with VisionLanguageModel(ModelConfig(smol["llama-2x2"], smol["mmproj-4x4"], n_threads=2)) as model:
        assert model.projector == "idefics3" and model.family.global_view_only and not model.uses_mrope
        frame = model.encode_frame(np.zeros((240, 320, 3), np.uint8))
        try:
            n = mtmd.mtmd_input_chunks_size(frame.chunks)
            chunks = [mtmd.mtmd_input_chunks_get(frame.chunks, i) for i in range(n)]
            kinds = [mtmd.mtmd_input_chunk_get_type(c) for c in chunks]
            images = [i for i, k in enumerate(kinds) if k == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE]
            assert len(images) == 1 + 1  # one tile and the global view
            assert all(mtmd.mtmd_input_chunk_get_n_tokens(chunks[i]) == VIEW_TOKENS for i in images)
            text = [b"".join(model.token_bytes(t, special=True) for t in model.chunk_text_tokens(c)) if k == 0 else b""
                    for c, k in zip(chunks, kinds, strict=True)]
            assert text[images[0] - 1] == b"<fake_token_around_image><row_1_col_1>"
            assert text[images[-1] - 1] == b"\n\n<fake_token_around_image><global-img>"
            assert text[images[-1] + 1] == b"<fake_token_around_image>"
            # The frame the session decodes: the global view alone, its grid square, positions 1-D.
            assert frame.decode == [images[-1]]
            assert (frame.n_tokens, frame.n_pos, frame.nx, frame.ny) == (VIEW_TOKENS, VIEW_TOKENS, 4, 4)
            # mtmd itself calls it nx = 16, ny = 1 (no M-RoPE: mtmd.cpp split_batch_to_chunk)
            image = mtmd.mtmd_input_chunk_get_tokens_image(chunks[images[-1]])
            assert (mtmd.mtmd_image_tokens_get_nx(image), mtmd.mtmd_image_tokens_get_ny(image)) == (VIEW_TOKENS, 1)
        finally:
            model.free_frame(frame)
        session = Session(model, SessionConfig(n_ctx=1024, question_room=128))
        assert session.video_close == model.tokenize("<fake_token_around_image>")
        wrapper_open = model.tokenize("\n\n<fake_token_around_image><global-img>")
        assert session.memory.prefix_tokens == len(model.tokenize(session.opening_text, add_special=True)) + len(
            wrapper_open)
        for f in SyntheticSource(seed=1, n_frames=3, size=FOUR_BY_THREE):
            record, _ = session.insert_frame(f)
            assert record.n_tokens == VIEW_TOKENS  # one view a frame, no tiles, no per-frame text
        assert session.memory.video_tokens == 3 * VIEW_TOKENS


# The invariants of the compression issue, on this pair: the same tests as for the tiny llama.
PASS_CASES = [  # model, projector, flash attention, positions, cache type, (tar, van, pool)
    ("llama-2x2", "mmproj-4x4", "on", "reindex", "f16", (True, True, True)),
    ("llama-2x2", "mmproj-4x4", "off", "keep", "f16", (True, True, True)),
    ("llama-3x4", "mmproj-4x4", "off", "reindex", "f32", (True, True, False)),
]


@pytest.mark.parametrize("case", PASS_CASES, ids=["-".join(map(str, c[:5])) for c in PASS_CASES])
def test_native_pass_selects_the_reference_tokens_and_moves_the_bytes(case: tuple, smol: dict[str, Path]) -> None:
    test_compression.test_native_pass_selects_the_reference_tokens_and_moves_the_bytes(case, smol)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_keeping_everything_leaves_the_logits_bit_identical(smol: dict[str, Path], positions: str) -> None:
    test_compression.test_keeping_everything_leaves_the_logits_bit_identical(smol, positions, "off")


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_one_head_drops_equal_a_cache_that_only_held_the_kept_tokens(smol: dict[str, Path], positions: str) -> None:
    test_compression.test_one_head_drops_equal_a_cache_that_only_held_the_kept_tokens(smol, positions)


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_direct_and_portable_passes_leave_byte_identical_states(smol: dict[str, Path], flash_attn: str) -> None:
    case = ("llama-2x2", "mmproj-4x4", flash_attn, "f16", "infinipot-v")
    test_direct_pass.test_direct_and_portable_passes_leave_byte_identical_states(case, smol)


def test_the_fixture_script_runs_on_its_own_and_repeats_byte_for_byte(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    for out in ("a", "b"):
        done = subprocess.run([sys.executable, "-m", "scripts.make_fixtures_smolvlm2", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=wall_s(300), cwd=root)
        assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
