"""Checkpoints: a memory saved and restored into a fresh session is the same memory, bit for bit; a checkpoint
made otherwise is refused in one line; a damaged one is skipped for the previous one; and a process killed at
any moment, restarted, finds a complete checkpoint or starts fresh (the crash test)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from checkpoint_child import BUDGET, scene  # scene(): the one place that names the synthetic source's class
from probes import probe_logits
from test_compression import N_CTX, open_model, variants  # noqa: F401 - variants is a fixture
from wallclock import wall_s

from edge_runtime import checkpoint
from edge_runtime.builtin import edge_vlm_files
from edge_runtime.checkpoint import CheckpointMismatch
from edge_runtime.errors import SettingsError
from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import InfiniPotV, make_policy
from edge_runtime.session import Session, SessionConfig


def config(**kw: object) -> SessionConfig:
    return SessionConfig(**{"n_ctx": N_CTX, "budget": BUDGET, "question_room": 128, "max_answer_tokens": 4, **kw})


def bits(logits: np.ndarray) -> np.ndarray:
    return logits.view(np.uint32)


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def rewrite_meta(path: Path, edit) -> None:
    """Rewrite a checkpoint's metadata as another build would have written it, through the documented
    layout (header, JSON, blob, tables; SHA-256 over all but itself), re-signed so that only the edit differs."""
    data = path.read_bytes()
    magic, version, flags, n_meta, n_state, n_tables, _ = struct.unpack_from("<8sIIQQQ32s", data)
    meta = json.loads(data[72:72 + n_meta])
    edit(meta)
    new_meta = json.dumps(meta).encode()
    head = struct.pack("<8sIIQQQ", magic, version, flags, len(new_meta), n_state, n_tables)
    rest = new_meta + data[72 + n_meta:]
    path.write_bytes(head + hashlib.sha256(head + rest).digest() + rest)


def stream(session: Session, frames) -> None:
    for frame in frames:
        session.insert_frame(frame)


# -- the round trip ------------------------------------------------------------------------------------

ROUND_TRIPS = [  # model, positions, in place, policy
    ("llama-3x4", "reindex", True, "infinipot-v"),
    ("llama-3x4", "reindex", False, "infinipot-v"),
    ("llama-3x4", "keep", True, "infinipot-v"),
    ("llama-3x4", "keep", False, "infinipot-v"),
    ("llama-2x2", "reindex", True, "random"),  # its generator goes on where it was
]


@pytest.mark.parametrize("case", ROUND_TRIPS, ids=["-".join(map(str, c)) for c in ROUND_TRIPS])
def test_a_restored_memory_is_the_saved_one_bit_for_bit_and_goes_on_compressing(
        case: tuple, variants: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    name, positions, direct, policy = case
    model = open_model(variants, name, "mmproj-4x4", use_gpu=not direct)  # in place: a cache the CPU reads
    try:
        report, path = assert_round_trip(model, config(positions=positions, direct_pass=direct), policy,
                                         list(scene(seed=2, n_frames=16)), 9, tmp_path)
        assert report.passes >= 2
        assert path == ("direct" if direct and positions == "reindex" else "portable")
    finally:
        model.close()


def assert_round_trip(model: VisionLanguageModel, cfg: SessionConfig, policy: str, frames: list, split: int,
                      directory: Path) -> tuple[checkpoint.RestoreReport, str]:
    """Stream frames[:split], ask, save; restore into a fresh session: the same state, tables, records, logits
    bit for bit; then both stream the rest alike (more passes, the same logits, the same answer). Returns the
    restore's report and the path the restored session's last pass took."""
    before = Session(model, cfg, make_policy(policy))
    stream(before, frames[:split])
    before.ask("What is on the left?")
    assert before.memory.passes >= 1
    saved = checkpoint.save(before, directory, last_timestamp=42.5)
    assert saved.path == directory / "memory.ckpt" and saved.bytes == saved.path.stat().st_size
    logits = probe_logits(before.context, before.memory.next_pos)

    after = Session(model, cfg, make_policy(policy))
    report = checkpoint.restore(after, directory)
    assert report is not None and report.path == saved.path and report.skipped == ()
    assert (report.frames_seen, report.passes, report.last_timestamp) == (split, before.memory.passes, 42.5)
    np.testing.assert_array_equal(bits(probe_logits(after.context, after.memory.next_pos)), bits(logits))
    assert after.context.state_bytes() == before.context.state_bytes()
    a, b = before.memory, after.memory
    assert (a.next_pos, a.passes, a.frames_since_pass, a.records) == (b.next_pos, b.passes, b.frames_since_pass,
                                                                      b.records)
    for x, y in zip(a.slots.arrays(), b.slots.arrays(), strict=True):
        np.testing.assert_array_equal(x, y)
    assert after.history == before.history and after.frames_seen == before.frames_seen

    # Both go on alike: more passes, the same logits and the same answer (the history included).
    stream(before, frames[split:])
    stream(after, frames[split:])
    assert after.memory.passes == before.memory.passes > report.passes
    assert after.compressor.last.path == before.compressor.last.path
    np.testing.assert_array_equal(bits(probe_logits(after.context, after.memory.next_pos)),
                                  bits(probe_logits(before.context, before.memory.next_pos)))
    assert after.ask("And now?").text == before.ask("And now?").text
    path = after.compressor.last.path
    before.close()
    after.close()
    return report, path


def test_a_checkpoint_keeps_the_previous_one_and_the_empty_directory_starts_fresh(
        tiny_model: VisionLanguageModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="edge_runtime.checkpoint"):
        assert checkpoint.restore(Session(tiny_model, config(), InfiniPotV()), tmp_path / "none") is None
    assert [r.getMessage() for r in caplog.records] == [f"no checkpoint in {tmp_path / 'none'} yet: starting with "
                                                        "an empty memory"]
    session = Session(tiny_model, config(), InfiniPotV())
    for i, frame in enumerate(scene(seed=1, n_frames=3)):
        session.insert_frame(frame)
        checkpoint.save(session, tmp_path)
        assert sorted(files_of(tmp_path)) == (["memory.ckpt"] if i == 0 else ["memory.ckpt", "memory.prev.ckpt"])
    assert checkpoint.read_checkpoint(tmp_path / "memory.ckpt").meta["frames_seen"] == 3
    assert checkpoint.read_checkpoint(tmp_path / "memory.prev.ckpt").meta["frames_seen"] == 2
    with pytest.raises(SettingsError, match="^a checkpoint can only be restored into a fresh session"):
        checkpoint.restore(session, tmp_path)


def test_the_policy_saves_at_its_interval(tiny_model: VisionLanguageModel, tmp_path: Path) -> None:
    session = Session(tiny_model, config(), InfiniPotV())
    stream(session, scene(seed=1, n_frames=2))
    policy = checkpoint.CheckpointPolicy(tmp_path, checkpoint_every=10.0)
    assert policy.maybe_save(session, now=100.0) is not None  # the first call saves
    assert policy.maybe_save(session, now=109.9) is None
    assert policy.maybe_save(session, now=110.0).frames_seen == 2
    assert checkpoint.CheckpointPolicy(tmp_path).checkpoint_every == 120.0


# -- refusals ------------------------------------------------------------------------------------------

def _version(meta: dict) -> None:
    meta["identity"]["llama_cpp_python"] = "0.3.1"


def _build(meta: dict) -> None:
    meta["identity"]["llama_cpp_build"] = "ggml 0.0.1 (abcdef0)"


def _family(meta: dict) -> None:  # the family comes from the mmproj: only another build would name it otherwise
    meta["settings"]["family"] = "Qwen2.5-VL"


MISMATCHES = {  # what differs: (model, mmproj, config, policy, checkpoint edit, what the line says)
    "text model": ("llama-1x2", "mmproj-4x4", {}, {}, None, "with another text model"),
    "mmproj": ("llama-2x2", "mmproj-2x2", {}, {}, None, "with another mmproj"),
    "budget": ("llama-2x2", "mmproj-4x4", {"budget": 80}, {}, None, "with budget 64, this session has 80"),
    "positions": ("llama-2x2", "mmproj-4x4", {"positions": "keep"}, {}, None, "with positions 'reindex'"),
    "policy": ("llama-2x2", "mmproj-4x4", {}, {"name": "uniform"}, None, "with the infinipot-v policy"),
    "policy setting": ("llama-2x2", "mmproj-4x4", {}, {"alpha": 0.9}, None, "with policy setting alpha 0.5"),
    "n_ctx": ("llama-2x2", "mmproj-4x4", {"n_ctx": N_CTX + 256}, {}, None, f"with n_ctx {N_CTX}"),
    "system prompt": ("llama-2x2", "mmproj-4x4", {"system_prompt": "Be terse."}, {}, None,
                      "with session system_prompt"),
    "llama-cpp-python": ("llama-2x2", "mmproj-4x4", {}, {}, _version,
                         f"by llama-cpp-python 0.3.1, this is {llama_cpp.__version__}"),
    "llama.cpp build": ("llama-2x2", "mmproj-4x4", {}, {}, _build, "by llama.cpp build ggml 0.0.1 (abcdef0)"),
    "family": ("llama-2x2", "mmproj-4x4", {}, {}, _family, "with family 'Qwen2.5-VL', this session has 'LLaVA"),
}


@pytest.mark.parametrize("what", MISMATCHES)
def test_a_checkpoint_made_otherwise_is_refused_in_one_line_leaving_the_files(
        what: str, variants: dict[str, Path], tmp_path: Path) -> None:  # noqa: F811
    model_name, mmproj, cfg, policy, edit, says = MISMATCHES[what]
    model = open_model(variants, "llama-2x2", "mmproj-4x4")
    try:
        saved = Session(model, config(), InfiniPotV())
        stream(saved, scene(seed=3, n_frames=6))
        checkpoint.save(saved, tmp_path)
        saved.close()
    finally:
        model.close()
    if edit is not None:
        rewrite_meta(tmp_path / "memory.ckpt", edit)
    files = files_of(tmp_path)
    model = open_model(variants, model_name, mmproj)
    try:
        settings = dict(policy)
        fresh = Session(model, config(**cfg), make_policy(settings.pop("name", "infinipot-v"), **settings))
        state = fresh.context.state_bytes()
        with pytest.raises(CheckpointMismatch) as refused:
            checkpoint.restore(fresh, tmp_path)
        line = str(refused.value)
        assert "\n" not in line and says in line, line
        assert "start fresh" in line and line.startswith(f"checkpoint {tmp_path / 'memory.ckpt'} was made ")
        assert files_of(tmp_path) == files
        assert fresh.context.state_bytes() == state and fresh.frames_seen == 0  # the session is as it was
        stream(fresh, scene(seed=3, n_frames=1))
        fresh.close()
    finally:
        model.close()


def test_another_lora_or_none_is_refused(tmp_path: Path) -> None:
    text, mmproj, lora = edge_vlm_files()
    other = tmp_path / "other-lora.gguf"
    data = bytearray(lora.read_bytes())
    data[-1] ^= 1  # one weight's last byte: loads as well, another adapter
    other.write_bytes(bytes(data))
    ckpt = tmp_path / "ckpt"
    cfg = SessionConfig(n_ctx=1024, budget=256, question_room=128)
    for i, adapter in enumerate((lora, None, other)):
        model = VisionLanguageModel(ModelConfig(text, mmproj, lora_path=adapter, n_threads=2))
        session = None
        try:
            session = Session(model, cfg, InfiniPotV())
            if i == 0:
                stream(session, scene(seed=4, n_frames=2))
                checkpoint.save(session, ckpt)
                files = files_of(ckpt)
                continue
            with pytest.raises(CheckpointMismatch) as refused:
                checkpoint.restore(session, ckpt)
            expected = "with a LoRA" if adapter is None else "with another LoRA (sha256 "
            assert expected in str(refused.value) and "\n" not in str(refused.value)
            assert files_of(ckpt) == files
        finally:  # each memory before its model, and nothing of one model left when the next one loads
            if session is not None:
                session.close()
            model.close()
            del session, model


# -- damage ---------------------------------------------------------------------------------------------

def _flip(offset_of) -> callable:
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset_of(data)] ^= 0x10
        path.write_bytes(bytes(data))
    return damage


def _n_meta(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 16)[0]


DAMAGE = {
    "a byte of the state": _flip(lambda d: 72 + _n_meta(d) + 100),
    "a byte of the tables": _flip(lambda d: len(d) - 3),
    "a byte of the metadata": _flip(lambda d: 80),
    "a length in the header": _flip(lambda d: 24),
    "the magic": _flip(lambda d: 0),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "truncated in the header": lambda p: p.write_bytes(p.read_bytes()[:40]),
    "empty": lambda p: p.write_bytes(b""),
    "missing (a crash between the renames)": lambda p: p.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
        damage: str, tiny_model: VisionLanguageModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    session = Session(tiny_model, config(), InfiniPotV())
    frames = list(scene(seed=6, n_frames=8))
    stream(session, frames[:6])
    checkpoint.save(session, tmp_path)
    logits = probe_logits(session.context, session.memory.next_pos)
    stream(session, frames[6:])
    checkpoint.save(session, tmp_path)
    DAMAGE[damage](tmp_path / "memory.ckpt")
    files = files_of(tmp_path)

    restored = Session(tiny_model, config(), InfiniPotV())
    with caplog.at_level(logging.WARNING, logger="edge_runtime.checkpoint"):
        report = checkpoint.restore(restored, tmp_path)
    assert report is not None and report.path == tmp_path / "memory.prev.ckpt" and report.frames_seen == 6
    np.testing.assert_array_equal(bits(probe_logits(restored.context, restored.memory.next_pos)), bits(logits))
    warnings = [r.getMessage() for r in caplog.records]
    if damage.startswith("missing"):
        assert warnings == [] and report.skipped == ()
    else:
        assert len(warnings) == 1 and "\n" not in warnings[0] and str(tmp_path / "memory.ckpt") in warnings[0]
        assert report.skipped == (warnings[0].removesuffix("; trying an older one"),)
    assert files_of(tmp_path) == files


def test_with_both_checkpoints_damaged_it_starts_fresh_in_one_line(
        tiny_model: VisionLanguageModel, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    session = Session(tiny_model, config(), InfiniPotV())
    for frame in scene(seed=6, n_frames=2):
        session.insert_frame(frame)
        checkpoint.save(session, tmp_path)
    DAMAGE["a byte of the state"](tmp_path / "memory.ckpt")
    DAMAGE["truncated"](tmp_path / "memory.prev.ckpt")
    files = files_of(tmp_path)
    fresh = Session(tiny_model, config(), InfiniPotV())
    with caplog.at_level(logging.WARNING, logger="edge_runtime.checkpoint"):
        assert checkpoint.restore(fresh, tmp_path) is None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert "its SHA-256 does not match" in lines[0] and "truncated" in lines[1]
    assert lines[2] == f"no usable checkpoint in {tmp_path}: starting with an empty memory"
    assert files_of(tmp_path) == files and fresh.frames_seen == 0
    stream(fresh, scene(seed=6, n_frames=1))


# -- the crash test -------------------------------------------------------------------------------------

CHILD = Path(__file__).resolve().parent / "checkpoint_child.py"
KILLS = 22
# os.fsync / os.replace sleep this long in the child: save spans ~20 ms, frames ~10 ms; on a slower machine both
# scale, so that the kills land inside a save as often
PAUSE_S = wall_s(0.004)


def _read_line(proc: subprocess.Popen, deadline: float) -> str:
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            return proc.stdout.readline().decode().strip()
        if proc.poll() is not None:
            return proc.stdout.readline().decode().strip()
    raise AssertionError("the child did not answer in time")


def test_killed_at_any_moment_a_restart_finds_the_last_complete_checkpoint_or_starts_fresh(
        fixtures: dict[str, Path], tmp_path: Path) -> None:
    rng = random.Random(18)
    directory = tmp_path / "ckpt"
    saving: dict[int, str] = {}  # frames_seen -> logits digest, from the child's SAVING lines
    last_saved = last_saving = 0
    stats = {"restored": 0, "fresh": 0, "inside save": 0, "between renames": 0, "from prev": 0}
    t0 = time.monotonic()
    for run in range(KILLS + 1):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(CHILD.parent),
                                                                         os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, str(CHILD), str(fixtures["model"]), str(fixtures["mmproj"]),
                                 str(directory), str(PAUSE_S)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env)
        try:
            first = _read_line(proc, time.monotonic() + wall_s(60))
            if first == "FRESH":
                assert last_saved == 0, f"run {run} started fresh after checkpoint {last_saved} was saved"
                stats["fresh"] += 1
            else:
                word, n, digest, name = first.split()
                n = int(n)
                assert word == "RESTORED", first + proc.stderr.read().decode()
                # The last complete checkpoint: the last one saved, or the one a kill interrupted after its rename.
                assert n in (last_saved, last_saving), (run, n, last_saved, last_saving)
                assert digest == saving[n], f"run {run}: the memory restored for {n} frames is not the one saved"
                stats["restored"] += 1
                stats["from prev"] += name == "memory.prev.ckpt"
                last_saved = last_saving = n
            assert _read_line(proc, time.monotonic() + wall_s(60)) == "READY", proc.stderr.read().decode()
            if run == KILLS:
                break
            time.sleep(wall_s(rng.uniform(0.02, 0.4)))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=wall_s(30))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == -signal.SIGKILL and b"Traceback" not in err, err.decode()
        for line in out.decode().split("\n")[:-1]:  # the part after the last newline: a line the kill cut
            word, n, *rest = line.split()
            if word == "SAVING" and rest:
                saving[int(n)] = rest[0]
                last_saving = int(n)
            elif word == "SAVED":
                last_saved = int(n)
        stats["inside save"] += last_saving > last_saved
        names = {p.name for p in directory.iterdir()} if directory.exists() else set()
        stats["between renames"] += "memory.prev.ckpt" in names and "memory.ckpt" not in names
        # Whatever the moment, every file under a checkpoint's name is complete (the temp file may not be).
        for name in names - {"memory.ckpt.tmp"}:
            checkpoint.read_checkpoint(directory / name)
    elapsed = time.monotonic() - t0
    print(f"crash test: {KILLS} kills in {elapsed:.1f} s, {stats}")
    assert stats["restored"] >= KILLS - 3 and stats["inside save"] >= 5, stats
    assert last_saved > BUDGET // 16  # it made progress across the restarts: past the first pass
    shutil.rmtree(directory)
