"""The compression pass on real llama.cpp KV states: the tokens it keeps, the bytes it moves, the logits after."""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from types import ModuleType

import cv2
import llama_cpp
import numpy as np
import pytest
import reference_infinipot_v as ref
from probes import after_each_pass, everything_kept, moved_keys, probe_logits

from edge_runtime import _native_testing
from edge_runtime.context import Context
from edge_runtime.memory import SlotTable, VideoMemory
from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel
from edge_runtime.policies import InfiniPotV, SettingsError, SlidingWindow, TaR, Uniform, make_policy, policy_from_spec
from edge_runtime.policies.base import recent_frames
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource


@pytest.fixture(scope="session")
def variants(make_fixtures_module: ModuleType, fixtures: dict[str, Path],
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Text models of other depths and KV heads, projectors of other patch grids."""
    out = tmp_path_factory.mktemp("variants")
    files = {"llama-2x2": fixtures["model"], "mmproj-4x4": fixtures["mmproj"]}
    for n_layer, n_head_kv in [(1, 1), (3, 4), (1, 2)]:
        files[f"llama-{n_layer}x{n_head_kv}"] = make_fixtures_module.make_text_model(
            out / f"llama-{n_layer}x{n_head_kv}.gguf", n_layer=n_layer, n_head_kv=n_head_kv)
    # q8_0 blocks are 32 wide: a quantized cache needs heads of 32 dimensions
    files["llama-2x2-d32"] = make_fixtures_module.make_text_model(out / "llama-d32.gguf", n_layer=2, n_head_kv=2,
                                                                  n_head=2)
    for size in (32, 96):
        grid = size // 16
        files[f"mmproj-{grid}x{grid}"] = make_fixtures_module.make_mmproj(out / f"mmproj-{grid}.gguf", size)
    return files


N_CTX = 2048  # every session on the variant models


def open_model(variants: dict[str, Path], model: str, mmproj: str, **kw: object) -> VisionLanguageModel:
    return VisionLanguageModel(ModelConfig(variants[model], variants[mmproj], n_threads=2, **kw))


def gpu_tar_atol(pos_max: int) -> float:
    """How far a GPU's TaR may lie from the reference's, keys stored at positions up to pos_max.

    ggml-cuda is compiled with -use_fast_math (ggml/src/ggml-cuda/CMakeLists.txt:199 of the pinned llama.cpp),
    so rope.cu's theta = pos * powf(theta_scale, i / 2) (rope.cu:107) and its cosf/sinf (rope.cu:36-37) become
    the fast intrinsics: a key is stored turned by its angle plus an error that grows with the position, about
    pos * 2^-20 radians. The graph route un-rotates with the same device RoPE, so that error cancels there;
    the reference un-rotates with exact angles and keeps it. A cosine of two unit keys moves by at most the
    sum of their two residual turns: 2 * pos * 2^-20, given a margin of 2. The CPU backend rounds its float
    angles to about pos * 2^-24, the same on both sides of the CPU routes, which the reference matches exactly."""
    return 1e-3 + pos_max * 2.0**-18


class CheckedInfiniPotV(InfiniPotV):
    """InfiniPot-V that checks every selection against the NumPy reference and keeps what it saw.

    It watches its session's compressor (attach): what the pass read before choosing (the in-place pass moves
    each layer as soon as it is chosen), then the choice it made."""

    def __init__(self, use_tar: bool = True, use_van: bool = True, **kw: object) -> None:
        super().__init__(**kw)
        self.use_tar, self.use_van = use_tar, use_van
        self.geometry = None  # the session's KVGeometry, set by attach()
        self.seen: list[dict[str, np.ndarray]] = []

    def attach(self, session: Session) -> None:
        self.geometry = session.geometry
        session.compressor.on_read.append(self.saw_read)
        session.compressor.on_pass.append(self.saw_pass)

    def saw_read(self, kv: object, memory: VideoMemory, keep: int) -> None:
        self._before = {
            "keys": np.stack([kv.keys(layer) for layer in range(kv.n_layer)]),
            "values": np.stack([kv.values(layer) for layer in range(kv.n_layer)]),
            "tables": memory.slots.arrays(), "grid": memory.grid, "keep": keep,
            "oldest": recent_frames(memory, self.recent_fraction)}
        kv.record_scores(True)

    def saw_pass(self, kv: object, memory: VideoMemory, result: dict) -> None:
        seen = self._before
        keys, values, keep, (frame, patch, rot_pos) = seen["keys"], seen["values"], seen["keep"], seen["tables"]
        kept = result["kept"]
        geo = self.geometry
        # NeoX and M-RoPE pair halves; an M-RoPE key moved by a whole position turns every t, h and w pair
        # alike, so without an e section (Qwen2-VL's (16, 24, 24, 0)) it is a NeoX turn. Linear RoPE scaling
        # (Gemma 3's global layers) multiplies every position by freq_scale.
        assert not geo.rope_sections or geo.rope_sections[3] == 0
        unrotated = ref.rope_rotate(keys, -rot_pos * geo.freq_scale, geo.freq_base, geo.n_rot,
                                    neox=geo.rope_type != 0)
        recent = sorted({int(f) for f in frame[0, 0] if f >= seen["oldest"]})
        expected = ref.select_tokens(unrotated, values, frame, patch, seen["grid"], recent, keep, alpha=self.alpha,
                                     pool=self.pool, use_tar=self.use_tar, use_van=self.use_van)
        tar, van = kv.scores()
        # The choice from the scores the pass computed is the reference's, exactly, on every route and backend.
        for layer, head in np.ndindex(frame.shape[:2]):
            np.testing.assert_array_equal(kept[layer, head], ref.choose_from_scores(
                tar[layer, head], van[layer, head], frame[layer, head] >= recent[0], keep, self.alpha, self.use_tar,
                self.use_van), err_msg=f"layer {layer}, head {head}: not the choice from the pass's own scores")
        on_device = kv.path == "graph" and kv.backend != "CPU"
        tar_atol = gpu_tar_atol(int(rot_pos.max())) if on_device else 1e-3
        self.check_recorded_scores((tar, van), unrotated, values, frame, patch, recent, seen["grid"], tar_atol)
        overlap = float(np.mean([np.isin(kept[i], expected[i]).mean() for i in np.ndindex(kept.shape[:2])]))
        if on_device:  # scores within the bound; the reference's kept set may differ where two were that close
            logging.getLogger(__name__).info("pass %d on %s: %.4f of the kept slots are the reference's",
                                             len(self.seen) + 1, kv.backend, overlap)
        else:
            np.testing.assert_array_equal(kept, expected)
        self.seen.append({"keys": keys, "values": values, "kept": kept, "rot_pos": rot_pos, "overlap": overlap})

    def check_recorded_scores(self, scores: tuple[np.ndarray, np.ndarray], keys: np.ndarray, values: np.ndarray,
                              frame: np.ndarray, patch: np.ndarray, recent: list[int], grid: tuple[int, int],
                              tar_atol: float = 1e-3) -> None:
        """The scores the pass records for diagnostics (scripts/retention.py) are the reference's, NaN where
        the policy computes none; TaR within tar_atol (gpu_tar_atol on a GPU's graph route)."""
        tar, van = scores
        max_dev = 0.0
        n_layer, (nx, ny) = frame.shape[0], grid
        for layer, head in np.ndindex(frame.shape[:2]):
            fr, pa = frame[layer, head], patch[layer, head]
            past = np.flatnonzero(fr < recent[0])
            if self.use_tar:
                table = ref.recent_slot_table(fr, pa, recent, nx * ny)
                want = ref.tar_scores(keys[layer, head], pa, table, past)
                max_dev = max(max_dev, float(np.abs(tar[layer, head, past] - want).max(initial=0.0)))
                np.testing.assert_allclose(tar[layer, head, past], want, rtol=1e-3, atol=tar_atol)
                assert np.isnan(tar[layer, head, fr >= recent[0]]).all()
            else:
                assert np.isnan(tar[layer, head]).all()
            if self.use_van:
                kernel = ref.pool_kernel(layer, n_layer) if self.pool else 1
                np.testing.assert_allclose(van[layer, head], ref.van_scores(values[layer, head], fr, pa, nx, kernel),
                                           rtol=1e-3)
            else:
                assert np.isnan(van[layer, head]).all()
        logging.getLogger(__name__).info("TaR: max |pass - reference| %.2e (bound %.2e)", max_dev, tar_atol)


CASES = [  # model, projector, flash attention (off: transposed V), positions, cache type, (tar, van, pool)
    ("llama-2x2", "mmproj-4x4", "on", "reindex", "f16", (True, True, False)),
    ("llama-2x2", "mmproj-4x4", "off", "keep", "f16", (True, True, True)),
    ("llama-1x1", "mmproj-2x2", "off", "reindex", "f16", (True, True, True)),
    ("llama-3x4", "mmproj-6x6", "on", "keep", "f16", (True, True, False)),
    ("llama-3x4", "mmproj-2x2", "off", "reindex", "f16", (True, False, False)),
    ("llama-1x2", "mmproj-6x6", "on", "reindex", "f16", (False, True, True)),
    ("llama-2x2", "mmproj-4x4", "on", "reindex", "f32", (True, True, True)),
    ("llama-3x4", "mmproj-2x2", "off", "keep", "f32", (True, True, False)),
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c[:5])) for c in CASES])
def test_native_pass_selects_the_reference_tokens_and_moves_the_bytes(case: tuple, variants: dict[str, Path]) -> None:
    model_name, mmproj, flash_attn, positions, cache_type, (use_tar, use_van, pool) = case
    with open_model(variants, model_name, mmproj, flash_attn=flash_attn, cache_type=cache_type) as model:
        probe = model.encode_frame(np.zeros((8, 8, 3), np.uint8))
        p = probe.n_tokens
        model.free_frame(probe)
        policy = CheckedInfiniPotV(use_tar=use_tar, use_van=use_van, pool=pool)
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=16 * p, positions=positions, question_room=128),
                          policy)
        policy.attach(session)
        kv = session.compressor.native
        kv.read()
        assert kv.v_trans == (flash_attn == "off")  # llamacpp-notes: no flash attention, transposed V
        # passes before frames 16, 20, 24, 28
        for seen in after_each_pass(session, SyntheticSource(seed=3, n_frames=16 + 4 * 3 + 1)):
            # The pass just ran, then the new frame went in after the kept slots: check what moved.
            kept, keep = seen["kept"], seen["kept"].shape[2]
            kv.read()
            for layer in range(kv.n_layer):
                new_keys, old_keys = moved_keys(kv, seen, layer, keep)
                if positions == "keep":
                    np.testing.assert_array_equal(new_keys, old_keys)
                else:  # re-rotated from where each key was to its compact slot, in fp16
                    geo = session.geometry
                    old_pos = np.take_along_axis(seen["rot_pos"][layer], kept[layer], axis=1)
                    delta = session.memory.prefix_tokens + np.arange(keep) - old_pos
                    expected = ref.rope_rotate(old_keys, delta, geo.freq_base, geo.n_rot, neox=False)
                    np.testing.assert_allclose(new_keys, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
        assert len(policy.seen) == 4
        assert session.memory.video_tokens <= 16 * p
        if positions == "reindex":
            assert session.memory.next_pos == session.memory.prefix_tokens + 12 * p + p
        assert session.ask("What happened?", max_tokens=4).n_tokens > 0


@pytest.mark.parametrize("positions", ["keep", "reindex"])
@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_keeping_everything_leaves_the_logits_bit_identical(variants: dict[str, Path], positions: str,
                                                            flash_attn: str) -> None:
    with open_model(variants, "llama-2x2", "mmproj-4x4", flash_attn=flash_attn) as model:
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=256, positions=positions, question_room=128),
                          make_policy("infinipot-v"))
        for frame in SyntheticSource(seed=4, n_frames=8):
            session.insert_frame(frame)
        before = probe_logits(session.context, session.memory.next_pos)
        everything_kept(session.compressor.native, session, positions == "reindex")
        assert np.array_equal(probe_logits(session.context, session.memory.next_pos), before)


def test_a_failed_write_back_restores_the_memory(variants: dict[str, Path]) -> None:
    with open_model(variants, "llama-2x2", "mmproj-4x4") as model:
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=256, question_room=128), make_policy("infinipot-v"))
        for frame in SyntheticSource(seed=5, n_frames=6):
            session.insert_frame(frame)
        state = session.context.state_bytes()
        kv = session.compressor.native
        kv.read()
        with pytest.raises(RuntimeError, match="restored as it was"):
            _native_testing.truncated_write_back(kv)
        assert session.context.state_bytes() == state


def frame_embeddings(model: VisionLanguageModel, image: np.ndarray) -> np.ndarray:
    """The projector's output for one BGR frame, of the image the session decodes: [tokens, n_embd]."""
    return model.frame_embeddings(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))


def decode_embeddings(context: Context, embd: np.ndarray, positions: np.ndarray) -> None:
    batch = llama_cpp.llama_batch_init(len(embd), context.model.n_embd, 1)
    try:
        batch.n_tokens = len(embd)
        flat = np.ascontiguousarray(embd, np.float32).ravel()
        ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
        for i, pos in enumerate(positions):
            batch.pos[i] = int(pos)
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 0
        assert llama_cpp.llama_decode(context.ctx, batch) == 0
    finally:
        llama_cpp.llama_batch_free(batch)


@pytest.mark.parametrize("positions", ["keep", "reindex"])
def test_one_head_drops_equal_a_cache_that_only_held_the_kept_tokens(variants: dict[str, Path],
                                                                    positions: str) -> None:
    """With one layer and one KV head a token's K and V depend on it alone, so the compressed cache must
    equal one built from the kept tokens only: at their old positions (keep) or at the compact ones."""
    frames = list(SyntheticSource(seed=6, n_frames=10))
    with open_model(variants, "llama-1x1", "mmproj-4x4") as model:
        policy = CheckedInfiniPotV()
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=128, positions=positions, question_room=128),
                          policy)
        policy.attach(session)
        for frame in frames:
            session.insert_frame(frame)
        assert session.memory.passes == 1  # at frame 9: 8 frames of 16 tokens down to 6
        compressed = probe_logits(session.context, session.memory.next_pos)
        seen = policy.seen[0]
        prefix, next_pos = session.memory.prefix_tokens, session.memory.next_pos
    with open_model(variants, "llama-1x1", "mmproj-4x4") as model:
        fresh = Session(model, SessionConfig(n_ctx=N_CTX, question_room=128))
        embd = np.concatenate([frame_embeddings(model, f.image) for f in frames])
        kept = seen["kept"][0, 0]
        old_pos = seen["rot_pos"][0, 0]
        if positions == "keep":  # llama.cpp decodes only at max + 1: decode all, then drop the rest
            decode_embeddings(fresh.context, embd[:len(old_pos)], old_pos)
            for pos in np.setdiff1d(old_pos, old_pos[kept]):
                fresh.context.remove_positions(int(pos), int(pos) + 1)
        else:
            decode_embeddings(fresh.context, embd[kept], prefix + np.arange(len(kept)))
        last = embd[len(seen["rot_pos"][0, 0]):]  # the frame decoded after the pass
        decode_embeddings(fresh.context, last, np.arange(next_pos - len(last), next_pos))
        assert fresh.memory.prefix_tokens == prefix
        np.testing.assert_allclose(probe_logits(fresh.context, next_pos), compressed, rtol=1e-3, atol=1e-3)


def test_a_stream_of_twenty_contexts_stays_within_budget(fixtures: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"], n_threads=2)) as model:
        assert model.n_ctx_train == 1024
        session = Session(model, SessionConfig(n_ctx=512, budget=128, question_room=128), make_policy("infinipot-v"))
        most_tokens = most_pos = 0
        for frame in SyntheticSource(seed=7, n_frames=20 * 1024 // 16):
            session.insert_frame(frame)
            most_tokens = max(most_tokens, session.memory.video_tokens)
            most_pos = max(most_pos, session.memory.next_pos)
        assert session.frames_seen * 16 == 20 * 1024
        assert most_tokens <= 128
        assert most_pos <= session.memory.prefix_tokens + 128 + 16
        assert session.ask("What did you see?", max_tokens=4).n_tokens > 0


def test_bad_settings_are_refused(fixtures: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"])) as model:
        frame = next(iter(SyntheticSource(n_frames=1)))
        with pytest.raises(SettingsError, match="one frame needs 16 tokens but the video memory holds 8"):
            Session(model, SessionConfig(n_ctx=512, budget=8, question_room=128),
                    make_policy("infinipot-v")).insert_frame(frame)
        with pytest.raises(SettingsError, match=r"\|C\| must be smaller than \|M\|"):
            Session(model, SessionConfig(n_ctx=512, budget=128, keep_fraction=1.0, question_room=128),
                    make_policy("infinipot-v"))
        with pytest.raises(SettingsError, match="alpha must be in"):
            make_policy("infinipot-v", alpha=1.5)
        with pytest.raises(SettingsError, match="needs a context of at least"):
            Session(model, SessionConfig(n_ctx=512, budget=4096, question_room=128), make_policy("infinipot-v"))
        session = Session(model, SessionConfig(n_ctx=512, budget=64, question_room=128),
                          make_policy("infinipot-v", alpha=0.1))
        with pytest.raises(SettingsError, match="cannot hold the 1 recent frames"):
            for frame in SyntheticSource(n_frames=6):
                session.insert_frame(frame)


def test_policy_specs_carry_infinipot_v_settings_and_refuse_the_rest() -> None:
    plain = policy_from_spec("infinipot-v")
    assert (plain.alpha, plain.recent_fraction, plain.pool) == (0.5, 0.125, False)
    tuned = policy_from_spec("infinipot-v:alpha=0.9+recent=0.25+pool+shared")
    assert (type(tuned), tuned.alpha, tuned.recent_fraction, tuned.pool, tuned.shared) == (InfiniPotV, 0.9, 0.25,
                                                                                           True, True)
    assert isinstance(policy_from_spec("tar:recent=0.25"), TaR)
    assert isinstance(policy_from_spec("uniform"), Uniform)
    for spec, why in (("uniform:alpha=0.9", "only InfiniPot-V"), ("infinipot-v:beta=1", "bad setting 'beta=1'"),
                      ("infinipot-v:alpha=high", "give a number"), ("infinipot-v:pool=1", "bad setting"),
                      ("infinipot-v:alpha=2", "alpha must be in"), ("lru", "unknown policy 'lru'")):
        with pytest.raises(SettingsError, match=why):
            policy_from_spec(spec)


@pytest.mark.parametrize("positions", ["reindex", "keep"])
def test_shared_infinipot_v_keeps_one_set_for_every_head_by_vote(variants: dict[str, Path], positions: str) -> None:
    with open_model(variants, "llama-3x4", "mmproj-4x4", flash_attn="on") as model:
        policy = policy_from_spec("infinipot-v:shared")
        chosen: list[np.ndarray] = []
        votes: list[np.ndarray] = []

        n_slots: list[int] = []

        def recorded(kv: object, memory: VideoMemory, result: dict) -> None:
            per_head = result["per_head"]  # the per-head choices that voted
            votes.append(np.bincount(per_head.ravel(), minlength=n_slots[-1]))
            chosen.append(result["kept"])

        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=128, positions=positions, question_room=128),
                          policy)
        session.compressor.on_read.append(lambda kv, memory, keep: n_slots.append(memory.video_tokens))
        session.compressor.on_pass.append(recorded)
        for frame in SyntheticSource(seed=5, n_frames=20):
            session.insert_frame(frame)
        assert len(chosen) >= 3
        for kept, count in zip(chosen, votes, strict=True):
            assert (kept == kept[0, 0]).all()  # one set for every (layer, head)
            assert count[kept[0, 0]].min() >= np.delete(count, kept[0, 0]).max()  # the most agreed-on slots
        frame, patch, _ = session.memory.slots.arrays()
        assert (frame == frame[:1, :1]).all() and (patch == patch[:1, :1]).all()
        assert session.ask("What did you see?", max_tokens=4).n_tokens > 0


def test_a_quantized_cache_gets_a_clear_error_and_keeps_its_memory(variants: dict[str, Path]) -> None:
    with open_model(variants, "llama-2x2-d32", "mmproj-4x4", cache_type="q8_0", flash_attn="on") as model:
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=64, question_room=128), make_policy("infinipot-v"))
        with pytest.raises(ModelError, match="the KV cache is q8_0; compression supports f16 and f32"):
            for frame in SyntheticSource(n_frames=6):
                session.insert_frame(frame)
        assert session.memory.video_tokens == 64
        assert session.ask("What?", max_tokens=2).n_tokens > 0


@pytest.mark.parametrize("name", ["sliding-window", "uniform", "random", "tar", "van", "infinipot-v"])
def test_every_policy_keeps_the_budget(fixtures: dict[str, Path], name: str) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"])) as model:
        session = Session(model, SessionConfig(n_ctx=512, budget=128, question_room=128), make_policy(name))
        for frame in SyntheticSource(seed=8, n_frames=40):
            session.insert_frame(frame)
            assert session.memory.video_tokens <= 128
        assert session.memory.passes == 16
        if name in ("sliding-window", "uniform"):  # whole-frame baselines: every head holds the same
            frames = session.memory.slots.frame[:, :, :session.memory.video_tokens]
            assert (frames == frames[0, 0]).all()
        assert session.ask("What?", max_tokens=2).n_tokens > 0


def test_sliding_window_keeps_the_sinks_and_the_newest(fixtures: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"])) as model:
        session = Session(model, SessionConfig(n_ctx=512, budget=128, question_room=128), SlidingWindow(sink_tokens=4))
        for frame in SyntheticSource(seed=8, n_frames=20):
            session.insert_frame(frame)
        frame_of = session.memory.slots.frame[0, 0, :session.memory.video_tokens]
        assert list(frame_of[:4]) == [0, 0, 0, 0] and frame_of[-1] == 19


@pytest.mark.parametrize("ascending", [True, False])
def test_the_slot_tables_keep_what_a_gather_keeps(ascending: bool) -> None:
    # The native bookkeeping against NumPy: ascending lists compact in place, any other order through a copy.
    rng = np.random.default_rng(5)
    slots = SlotTable(n_layer=3, n_head_kv=2, capacity=40)
    for frame in range(5):
        slots.append(frame + 10, 8, 100 + 8 * frame)
    before = slots.arrays()
    # Slots 8 on, so frame 10 is gone from every head.
    kept = np.stack([[rng.choice(np.arange(8, 40), 20, replace=False) for _ in range(2)] for _ in range(3)])
    kept = (np.sort(kept, axis=2) if ascending else kept).astype(np.int32)
    new_rot_pos = np.arange(7, 27, dtype=np.int32)
    present = slots.keep(kept, new_rot_pos)
    frame, patch, rot_pos = slots.arrays()
    np.testing.assert_array_equal(frame, np.take_along_axis(before[0], kept, axis=2))
    np.testing.assert_array_equal(patch, np.take_along_axis(before[1], kept, axis=2))
    np.testing.assert_array_equal(rot_pos, np.broadcast_to(new_rot_pos, kept.shape))
    np.testing.assert_array_equal(present, np.unique(frame))
    assert 10 not in present.tolist()
