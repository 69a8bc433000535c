"""Qwen2.5-VL (M-RoPE) on the real llama.cpp: mtmd's positions, the state layout, and the compression pass.

The tiny pair comes from scripts/make_fixtures_qwen25vl.py (architecture qwen2vl, projector qwen25vl).
Frames are 112 x 84 px here (28 px a token): a 4 x 3 patch grid, 12 tokens over 4 positions.
"""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import llama_cpp
import numpy as np
import pytest
import reference_infinipot_v as ref
from probes import after_each_pass, everything_kept, moved_keys, probe_logits
from test_checkpoint import assert_round_trip
from test_compression import CheckedInfiniPotV
from wallclock import wall_s

from edge_runtime import _native
from edge_runtime.cli import main
from edge_runtime.context import Context
from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import SettingsError, make_policy
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource
from scripts import make_fixtures_qwen25vl

FOUR_BY_THREE = (320, 240)  # the synthetic frames' size here: 4:3, for a patch grid that is not square
FRAME_SIDE = 112  # 4 x 3 tokens for the 4:3 synthetic frames
NX, NY = 4, 3


@pytest.fixture(scope="session")
def qwen_module() -> ModuleType:
    return make_fixtures_qwen25vl


@pytest.fixture(scope="session")
def qwen(qwen_module: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("qwen25vl")
    files = qwen_module.make_fixtures(out)
    files["model-1x1"] = out / "tiny-qwen2vl-1x1.gguf"  # one layer, one KV head: K and V depend on the token alone
    qwen_module.write_text_model(files["model-1x1"], 0, n_layer=1, n_head_kv=1)
    return files


def open_qwen(files: dict[str, Path], model: str = "model", **kw: object) -> VisionLanguageModel:
    return VisionLanguageModel(ModelConfig(files[model], files["mmproj"], n_threads=2, frame_side=FRAME_SIDE, **kw))


def test_mtmd_positions_and_the_m_rope_state_layout(qwen: dict[str, Path]) -> None:
    """Pins the llama.cpp facts the M-RoPE support relies on (see the notes in the report)."""
    with open_qwen(qwen) as model:
        geo = model.kv_geometry()
        assert model.projector == "qwen2.5vl_merger" and model.family.name == "Qwen2.5-VL"
        assert geo.rope_type == llama_cpp.LLAMA_ROPE_TYPE_MROPE and geo.mrope  # llama-model.cpp: qwen2vl -> MROPE
        assert geo.rope_sections == (2, 3, 3, 0)  # read from the GGUF array (llama.cpp's meta API skips arrays)
        assert model.token_px == 28
        session = Session(model, SessionConfig(n_ctx=2048, question_room=128))
        # mtmd wraps an image in <|vision_start|> ... <|vision_end|> (mtmd.cpp, qwen2vl/qwen25vl img_beg,
        # img_end): the opening one ends the prefix once, the closing one opens every question.
        video_open, video_close = model.video_wrapper()
        assert video_open == model.tokenize("<|vision_start|>") and len(video_open) == 1
        assert session.video_close == video_close == model.tokenize("<|vision_end|>")
        assert session.memory.prefix_tokens == len(model.tokenize(session.opening_text, add_special=True)) + 1
        frames = iter(SyntheticSource(seed=1, n_frames=3, size=FOUR_BY_THREE))
        records = [session.insert_frame(next(frames))[0] for _ in range(2)]
        for r in records:  # mtmd: nx x ny tokens at one position, n_pos = max(nx, ny) (mtmd.cpp get_n_pos)
            assert (r.nx, r.ny, r.n_tokens, r.n_pos) == (NX, NY, NX * NY, max(NX, NY))
        assert records[1].pos0 == records[0].pos0 + max(NX, NY)
        assert session.memory.next_pos == records[1].pos0 + max(NX, NY)  # text starts above every position
        params = _native.PassParams()
        params.n_prefix, params.n_head_kv = session.memory.prefix_tokens, geo.n_head_kv
        params.head_dim_k, params.head_dim_v, params.mrope = geo.head_dim_k, geo.head_dim_v, True
        params.rope_type, params.n_rot, params.freq_base, params.freq_scale = (geo.rope_type, geo.n_rot,
                                                                               geo.freq_base, geo.freq_scale)
        params.max_cells, params.max_position, params.rope_sections = 1024, 2048, list(geo.rope_sections)
        kv = _native.KVPass(session.context.ctx_address, params)
        kv.read()  # the parser consumed the blob exactly with 12 extension bytes a cell
        pos, ext = kv.slot_positions(), kv.slot_ext()
        i = np.arange(NX * NY)
        for f, r in enumerate(records):
            cells = slice(f * NX * NY, (f + 1) * NX * NY)
            assert (pos[cells] == r.pos0).all()  # all tokens of a frame share its position
            np.testing.assert_array_equal(ext[cells, 0], r.pos0 + i % NX)  # x = pos0 + column
            np.testing.assert_array_equal(ext[cells, 1], r.pos0 + i // NX)  # y = pos0 + row
        params.mrope, params.rope_sections = False, []
        no_ext = _native.KVPass(session.context.ctx_address, params)
        with pytest.raises(RuntimeError):  # the blob does not say it has the extension: the model does
            no_ext.read()


def test_the_default_frame_size_gives_whole_tokens(qwen: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(qwen["model"], qwen["mmproj"], n_threads=2)) as model:
        assert model.frame_size(1920, 1080) == (336, 196)  # 12 x 7 = 84 tokens
        assert model.frame_size(640, 480) == (336, 252)  # 12 x 9 = 108
        frame = model.encode_frame(np.zeros((480, 640, 3), np.uint8))
        model.free_frame(frame)
        assert (frame.nx, frame.ny, frame.n_tokens, frame.n_pos) == (12, 9, 108, 12)


def test_seq_add_aborts_the_process_on_m_rope(qwen: dict[str, Path]) -> None:
    """Why the runtime never calls llama_memory_seq_add: on M-RoPE models it aborts (llama-kv-cache.cpp seq_add)."""
    code = f"""
from pathlib import Path
import llama_cpp
from edge_runtime.context import Context
from edge_runtime.model import ModelConfig, VisionLanguageModel
m = VisionLanguageModel(ModelConfig(Path({str(qwen["model"])!r}), Path({str(qwen["mmproj"])!r})))
c = Context(m, 256)
c.decode_tokens(m.tokenize("hello there"), 0)
llama_cpp.llama_memory_seq_add(c.memory, 0, 0, -1, 5)
print("survived")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=wall_s(120))
    assert done.returncode != 0 and "survived" not in done.stdout
    assert "seq_add() is only supported for n_pos_per_embd() == 1" in done.stderr


@pytest.mark.parametrize("positions", ["keep", "reindex"])
@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_native_pass_selects_the_reference_tokens_and_moves_the_bytes(qwen: dict[str, Path], positions: str,
                                                                      flash_attn: str) -> None:
    p = NX * NY
    with open_qwen(qwen, flash_attn=flash_attn) as model:
        policy = CheckedInfiniPotV(pool=flash_attn == "off")
        session = Session(model, SessionConfig(n_ctx=2048, budget=16 * p, positions=positions, question_room=128),
                          policy)
        policy.attach(session)
        geo = session.geometry
        prefix = session.memory.prefix_tokens
        kv = session.compressor.native
        # passes before frames 16, 20, 24, 28
        for seen in after_each_pass(session, SyntheticSource(seed=3, n_frames=16 + 4 * 3 + 1, size=FOUR_BY_THREE)):
            assert session.compressor.last.path == "portable"  # cells share positions: never in place
            kept, keep = seen["kept"], seen["kept"].shape[2]
            kv.read()
            pos, ext = kv.slot_positions()[:keep], kv.slot_ext()[:keep]
            old_pos = np.take_along_axis(seen["rot_pos"][0, 0], kept[0, 0], axis=0)
            if positions == "keep":  # each cell as head (0, 0)'s token was: position and extension
                np.testing.assert_array_equal(pos, old_pos)
            else:  # compact positions; x, y moved with them
                np.testing.assert_array_equal(pos, prefix + np.arange(keep))
            patch = np.take_along_axis(session.memory.slots.patch[0, 0, :keep], np.arange(keep), axis=0)
            np.testing.assert_array_equal(ext[:, 0], pos + patch % NX)
            np.testing.assert_array_equal(ext[:, 1], pos + patch // NX)
            for layer in range(kv.n_layer):
                new_keys, old_keys = moved_keys(kv, seen, layer, keep)
                if positions == "keep":
                    np.testing.assert_array_equal(new_keys, old_keys)
                else:  # every t, h and w pair turned by the same delta: a NeoX turn with these sections
                    old = np.take_along_axis(seen["rot_pos"][layer], kept[layer], axis=1)
                    expected = ref.rope_rotate(old_keys, prefix + np.arange(keep) - old, geo.freq_base, geo.n_rot,
                                               neox=True)
                    np.testing.assert_allclose(new_keys, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        assert len(policy.seen) == 4
        assert session.memory.video_tokens <= 16 * p
        if positions == "reindex":  # above the last slot's row and column
            assert session.memory.next_pos == prefix + 12 * p + (max(NX, NY) - 1) + max(NX, NY)
        assert session.ask("What happened?", max_tokens=4).n_tokens > 0


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_keeping_everything_leaves_the_logits_bit_identical(qwen: dict[str, Path], positions: str) -> None:
    with open_qwen(qwen) as model:
        session = Session(model, SessionConfig(n_ctx=2048, budget=256, positions=positions, question_room=128),
                          make_policy("infinipot-v"))
        for frame in SyntheticSource(seed=4, n_frames=8, size=FOUR_BY_THREE):
            session.insert_frame(frame)
        before, state = probe_logits(session.context, session.memory.next_pos), session.context.state_bytes()
        everything_kept(session.compressor.native, session, positions == "reindex")
        assert session.context.state_bytes() == state
        assert np.array_equal(probe_logits(session.context, session.memory.next_pos), before)


def decode_at(context: Context, embd: np.ndarray, t: np.ndarray, y: np.ndarray, x: np.ndarray) -> None:
    """Decode embeddings at explicit M-RoPE positions (section-major: t, y, x, then 0), as mtmd's helper does."""
    n = len(embd)
    batch = llama_cpp.llama_batch_init(4 * n, context.model.n_embd, 1)  # pos needs 4 entries a token
    try:
        batch.n_tokens = n
        flat = np.ascontiguousarray(embd, np.float32).ravel()
        ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
        for k, section in enumerate((t, y, x, np.zeros(n, np.int64))):
            for i in range(n):
                batch.pos[k * n + i] = int(section[i])
        for i in range(n):
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        assert llama_cpp.llama_decode(context.ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


def test_reindexed_memory_equals_the_kept_tokens_decoded_at_the_compact_positions(qwen: dict[str, Path]) -> None:
    """One layer, one KV head: K and V of a token depend on it alone, so after a reindex pass the cache must
    give the logits of a fresh cache holding only the kept tokens, at t = P + j and x, y moved alike."""
    frames = list(SyntheticSource(seed=6, n_frames=10, size=FOUR_BY_THREE))
    p = NX * NY
    with open_qwen(qwen, "model-1x1") as model:
        policy = CheckedInfiniPotV()
        session = Session(model, SessionConfig(n_ctx=2048, budget=8 * p, positions="reindex", question_room=128),
                          policy)
        policy.attach(session)
        for frame in frames:
            session.insert_frame(frame)
        assert session.memory.passes == 1  # before frame 8: 8 frames down to 6
        compressed = probe_logits(session.context, session.memory.next_pos)
        kept = policy.seen[0]["kept"][0, 0]
        prefix, next_pos = session.memory.prefix_tokens, session.memory.next_pos
    with open_qwen(qwen, "model-1x1") as model:
        fresh = Session(model, SessionConfig(n_ctx=2048, question_room=128))
        assert fresh.memory.prefix_tokens == prefix
        embd = np.concatenate([model.frame_embeddings(np.ascontiguousarray(f.image[:, :, ::-1])) for f in frames])
        row, col = (kept % p) // NX, (kept % p) % NX
        t = prefix + np.arange(len(kept))
        decode_at(fresh.context, embd[kept], t, t + row, t + col)
        i = np.arange(p)
        for f in (8, 9):  # the frames decoded after the pass (before frame 8), as mtmd placed them
            t0 = next_pos - (10 - f) * max(NX, NY)
            decode_at(fresh.context, embd[f * p:(f + 1) * p], np.full(p, t0), t0 + i // NX, t0 + i % NX)
        np.testing.assert_allclose(probe_logits(fresh.context, next_pos), compressed, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_a_checkpoint_restores_the_m_rope_memory_bit_for_bit(qwen: dict[str, Path], positions: str,
                                                              tmp_path: Path) -> None:
    with open_qwen(qwen) as model:
        cfg = SessionConfig(n_ctx=1024, budget=4 * NX * NY, positions=positions, question_room=256,
                            max_answer_tokens=4)
        frames = list(SyntheticSource(seed=6, n_frames=12, size=FOUR_BY_THREE))
        report, _ = assert_round_trip(model, cfg, "infinipot-v", frames, 7, tmp_path)
        assert report.passes >= 1


def test_a_long_stream_keeps_its_positions_bounded(qwen: dict[str, Path]) -> None:
    """Twice the trained context in positions, in reindex mode: positions stay below P + |M| + n_pos."""
    with VisionLanguageModel(ModelConfig(qwen["model"], qwen["mmproj"], n_threads=2, frame_side=FRAME_SIDE)) as model:
        session = Session(model, SessionConfig(n_ctx=512, budget=96, question_room=128), make_policy("infinipot-v"))
        most_pos = 0
        n_frames = 2 * model.n_ctx_train // max(NX, NY)
        for frame in SyntheticSource(seed=7, n_frames=n_frames, size=FOUR_BY_THREE):
            session.insert_frame(frame)
            most_pos = max(most_pos, session.memory.next_pos)
            assert session.memory.video_tokens <= 96
        assert session.frames_seen * max(NX, NY) == 2 * model.n_ctx_train
        assert most_pos <= session.memory.prefix_tokens + 96 + max(NX, NY) - 1
        assert session.ask("What did you see?", max_tokens=4).n_tokens > 0


def test_a_qwen2_vl_projector_streams_and_compresses_alike(qwen_module: ModuleType, qwen: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """Qwen2-VL shares the text architecture, positions and mtmd handling; its projector has no window attention."""
    files = {"model": qwen["model"], "mmproj": tmp_path / "qwen2vl-mmproj.gguf"}
    qwen_module.write_mmproj(files["mmproj"], 0, projector="qwen2vl_merger")
    with open_qwen(files) as model:
        assert model.family.name == "Qwen2-VL"
        policy = CheckedInfiniPotV()
        session = Session(model, SessionConfig(n_ctx=2048, budget=8 * NX * NY, question_room=128), policy)
        policy.attach(session)
        for frame in SyntheticSource(seed=8, n_frames=12, size=FOUR_BY_THREE):
            session.insert_frame(frame)
        assert session.memory.passes == 2 and len(policy.seen) == 2  # each checked against the reference
        assert session.ask("What?", max_tokens=2).n_tokens > 0


def test_qwen3_vl_compression_is_refused_in_one_line(qwen_module: ModuleType, qwen: dict[str, Path],
                                                     tmp_path: Path) -> None:
    files = {"model": qwen["model"], "mmproj": tmp_path / "qwen3vl-mmproj.gguf"}
    qwen_module.write_mmproj(files["mmproj"], 0, projector="qwen3vl_merger")
    with open_qwen(files) as model:
        assert model.family.name == "Qwen3-VL"
        with pytest.raises(SettingsError, match=r"^Qwen3-VL cannot be compressed yet: interleaved M-RoPE .*; use "
                                                r"--policy full$"):
            Session(model, SessionConfig(n_ctx=2048, budget=96, question_room=128), make_policy("infinipot-v"))
        session = Session(model, SessionConfig(n_ctx=2048, question_room=128))  # the full cache streams
        assert session.video_close == model.tokenize("<|vision_end|>")


def test_the_cli_streams_qwen_under_a_budget(qwen: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["--synthetic", "2", "--max-frames", "30", "--model", str(qwen["model"]), "--mmproj",
               str(qwen["mmproj"]), "--frame-size", "112", "--budget", "96", "--ask", "What?",
               "--max-answer-tokens", "2", "--threads", "2", "--json"])
    assert rc == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    status = [e for e in events if e.get("event", e.get("type")) == "status"]
    assert len(status) == 30 and max(e["video_tokens"] for e in status) <= 96
    assert any(e.get("event", e.get("type")) == "answer" for e in events)


def test_the_fixture_script_runs_on_its_own_and_repeats_byte_for_byte(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    for out in ("a", "b"):
        done = subprocess.run([sys.executable, "-m", "scripts.make_fixtures_qwen25vl", "--out", str(tmp_path / out)],
                              capture_output=True, text=True, timeout=wall_s(300), cwd=root)
        assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(names) == 2
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
