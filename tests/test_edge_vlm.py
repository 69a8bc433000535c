"""The built-in edge-vlm (models/edge-vlm: trained mmproj + LoRA on SmolLM2-135M) as users meet it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from wallclock import wall_s

from edge_runtime import scenes
from edge_runtime.builtin import edge_vlm_files
from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

CMD = [sys.executable, "-m", "edge_runtime"]
ROOT = Path(__file__).resolve().parents[1]


def answers(model: VisionLanguageModel, stream: scenes.Stream, seed: int, n: int) -> list[str]:
    """Stream every frame into a fresh memory, then ask n questions of it."""
    with Session(model, SessionConfig(n_ctx=1536, max_answer_tokens=8)) as session:
        for frame in SyntheticSource(stream.seed, stream.n_frames):
            session.insert_frame(frame)
        return [session.ask(q.text).text for q in stream.ask_set(seed, n)]


def test_the_built_in_files_are_found() -> None:
    text, mmproj, lora = edge_vlm_files()
    assert text.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and mmproj.is_file() and lora.is_file()


def test_it_sees_what_is_in_short_clips() -> None:
    """On 12-frame clips of held-out seeds (what it was trained on) it answers most questions right."""
    text, mmproj, lora = edge_vlm_files()
    model = VisionLanguageModel(ModelConfig(text, mmproj, lora_path=lora, n_threads=2))
    right = total = 0
    try:
        for seed in range(4):
            stream = scenes.make_stream(seed, 12)
            truths = [q.answer for q in stream.ask_set(seed, 4)]
            right += sum(scenes.grade(a, t) for a, t in zip(answers(model, stream, seed, 4), truths, strict=True))
            total += len(truths)
    finally:
        model.close()
    assert right / total >= 0.6, f"{right}/{total}"  # 96 % on 20 streams when trained; random weights: ~0


def test_without_its_lora_the_encoder_alone_is_not_enough() -> None:
    """The adapter is part of the model: dropping it must change the answers (it is loaded, not ignored)."""
    text, mmproj, lora = edge_vlm_files()
    stream = scenes.make_stream(1, 6)
    results = []
    for adapter in (None, lora):
        model = VisionLanguageModel(ModelConfig(text, mmproj, lora_path=adapter, n_threads=2))
        try:
            results.append(answers(model, stream, 1, 4))
        finally:
            model.close()
    assert results[0] != results[1]


def test_a_lora_for_another_model_is_one_clear_error(fixtures: dict[str, Path]) -> None:
    expected = r"could not use the LoRA adapter .*incorrect shape.*\(pass the adapter trained for this text model\)"
    with pytest.raises(ModelError, match=expected):
        VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"], lora_path=edge_vlm_files()[2],
                                        n_threads=2))


def test_a_missing_lora_is_one_clear_error(tmp_path: Path) -> None:
    run = subprocess.run([*CMD, "--demo", "--lora", str(tmp_path / "nope.gguf")], capture_output=True, text=True,
                         timeout=wall_s(60))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [f"edge-runtime: error: LoRA adapter not found: {tmp_path / 'nope.gguf'} "
                                              "(pass an existing GGUF file with --lora)"]


def test_demo_answers_with_the_truth_beside(tmp_path: Path) -> None:
    run = subprocess.run([*CMD, "--demo", "--max-frames", "24", "--threads", "2", "--json"], capture_output=True,
                         text=True, timeout=wall_s(300))
    assert run.returncode == 0, run.stderr
    answers = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 9 and {a["frames"] for a in answers} == {8, 16, 24}
    assert all(a["correct"] == scenes.grade(a["answer"], a["truth"]) for a in answers)
    assert sum(a["correct"] for a in answers) >= 5, answers


def test_another_model_needs_its_mmproj(fixtures: dict[str, Path]) -> None:
    run = subprocess.run([*CMD, "--synthetic", "--model", str(fixtures["model"])], capture_output=True, text=True,
                         timeout=wall_s(60))
    assert run.returncode == 2
    assert "needs the multimodal projector made for it: add --mmproj PATH" in run.stderr


def test_retention_script_measures_what_each_policy_keeps(tmp_path: Path) -> None:
    out = tmp_path / "retention.json"
    run = subprocess.run([sys.executable, "-m", "scripts.retention", "--threads", "2", "--streams", "1",
                          "--frames", "24", "--budget", "1/4", "--policies", "full,infinipot-v:alpha=0.75,uniform",
                          "--out", str(out)], capture_output=True, text=True, timeout=wall_s(300), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    runs = {r["policy"]: r for r in json.loads(out.read_text())["runs"]}
    assert list(runs) == ["full", "infinipot-v:alpha=0.75", "uniform"]
    # The uncapped cache holds every object token: the object masks and the slot tables line up.
    assert runs["full"]["coverage"] == 1.0 and runs["full"]["heads_lost"] == 0.0
    assert 0 < runs["full"]["object_share_of_past_slots"] < 0.5  # mostly background: a fixed camera
    ipv = runs["infinipot-v:alpha=0.75"]
    assert 0 <= ipv["coverage"] <= 1 and len(ipv["tar_auc_by_layer"]) == len(ipv["van_auc_by_layer"]) == 30
    assert all(0 <= a <= 1 for a in ipv["tar_auc_by_layer"] + ipv["van_auc_by_layer"])
    assert "tar_auc" not in runs["uniform"]  # scores are InfiniPot-V's
    assert out.with_suffix(".png").stat().st_size > 10_000
