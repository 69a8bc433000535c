"""The benchmark scripts run end to end (on the tiny models, in seconds), so their figures can be rerun."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from wallclock import wall_s

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-m", f"scripts.{name}", *args], capture_output=True, text=True,
                         timeout=wall_s(300), cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return run


def tiny(fixtures: dict[str, Path]) -> list[str]:
    return ["--model", str(fixtures["model"]), "--mmproj", str(fixtures["mmproj"]), "--threads", "2"]


def test_memory_benchmark_compares_policies(fixtures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    run_script("benchmark_memory", *tiny(fixtures), "--frames", "40",
               "--runs", "full,sliding-window@128,infinipot-v@128", "--out", str(out))
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert [r["policy"] for r in result["runs"]] == ["full", "sliding-window", "infinipot-v"]
    full, _, capped = result["runs"]
    assert full["summary"]["frames"] == 40 and full["summary"]["passes"] == 0
    assert max(capped["series"]["video_tokens"]) == 128 and capped["summary"]["passes"] == 16
    assert capped["summary"]["kv_mb_at_end"] < full["summary"]["kv_mb_at_end"]
    assert len(capped["questions"]) == 10 and all(q["ttft_ms"] > 0 for q in capped["questions"])
    assert result["machine"]["cores"] >= 1
    assert full["summary"]["cut_at_frame"] is None and capped["summary"]["cut_at_frame"] is None


def test_a_memory_run_out_of_time_reports_where_it_was_cut(fixtures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    run_script("benchmark_memory", *tiny(fixtures), "--frames", "100000", "--runs", "infinipot-v@128",
               "--max-wall-s", str(wall_s(3)), "--out", str(out))
    summary = json.loads(out.read_text())["runs"][0]["summary"]
    assert 0 < summary["cut_at_frame"] == summary["frames"] < 100000 and summary["stopped_at_frame"] is None
    assert summary["passes"] > 0 and summary["video_tokens_after_first_pass"][1] <= 128


def test_compression_benchmark_reports_the_pass(fixtures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pass.json"
    run_script("benchmark_compression", *tiny(fixtures), "--budget", "128", "--passes", "3", "--out", str(out))
    summary = json.loads(out.read_text())["summary"]
    assert summary["pass_ms_median"] > 0 and summary["memcpy_ms_median"] > 0
    assert 0 < summary["pass_over_freed_room_ingest"] < 10


def test_ingest_benchmark_compares_with_bare_mtmd(fixtures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    run_script("benchmark_ingest", *tiny(fixtures), "--frames", "4", "--rounds", "1", "--out", str(out))
    result = json.loads(out.read_text())
    summary = result["summary"]
    assert summary["runtime_ms_median"] > 0 and summary["bare_plain_ms_median"] > 0
    assert summary["bare_runtime_context_ms_median"] > 0
    assert summary["callback_detached"]  # no decode after the probe pays for the evaluation callback
    assert [len(result[f"{loop}_ms"][0]) for loop in ("runtime", "bare_plain", "bare_runtime_context")] == [4, 4, 4]


def test_recall_benchmark_grades_every_question(fixtures: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "recall.json"
    run_script("benchmark_recall", *tiny(fixtures), "--streams", "2", "--frames", "12", "--questions-per-stream",
               "4", "--policies", "full,sliding-window", "--budgets", "1/4,1/2", "--out", str(out))
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert result["settings"]["tokens_per_frame"] == 16 and result["machine"]["cores"] >= 1
    digest = hashlib.sha256(fixtures["mmproj"].read_bytes()).hexdigest()[:16]  # which projector, by content
    assert result["settings"]["mmproj_sha256"] == digest and result["settings"]["lora_sha256"] is None
    runs = result["runs"]
    assert [(r["policy"], r["budget"], r["budget_tokens"]) for r in runs] == [
        ("full", None, None), ("sliding-window", "1/4", 48), ("sliding-window", "1/2", 96)]
    buckets = result["settings"]["depth_buckets"]
    groups = {"per_kind": lambda q: q["kind"],  # how a record is grouped, recomputed from the record
              "per_depth": lambda q: next(b for b, (lo, hi) in buckets.items() if lo <= q["depth"] / 12 < hi)}
    questions = [(q["stream"], q["question"], q["truth"]) for q in runs[0]["records"]]
    assert len(questions) == 8 and len(set(questions)) == 8
    for run in runs:
        records = run["records"]
        assert [(q["stream"], q["question"], q["truth"]) for q in records] == questions, "same questions, same order"
        assert run["n"] == len(records) and 0 <= run["accuracy"] <= 1
        assert run["accuracy"] == round(sum(q["correct"] for q in records) / len(records), 4)
        for group, of in groups.items():
            assert sum(g["n"] for g in run[group].values()) == len(records)
            for name, g in run[group].items():
                mine = [q for q in records if of(q) == name]
                assert g["n"] == len(mine)
                assert g["accuracy"] == (round(sum(q["correct"] for q in mine) / len(mine), 4) if mine else None)
        assert all(0 <= q["depth"] < 12 and isinstance(q["correct"], bool) and isinstance(q["answer"], str)
                   for q in records)
    assert [s["seed"] for s in result["streams"]] == [0, 1] and 0 <= result["majority_answer_accuracy"] <= 1


def test_recall_results_of_split_policies_merge_into_one(fixtures: dict[str, Path], tmp_path: Path) -> None:
    common = [*tiny(fixtures), "--streams", "1", "--frames", "8", "--questions-per-stream", "2", "--budgets", "1/4,1/2"]
    run_script("benchmark_recall", *common, "--policies", "full,uniform", "--out", str(tmp_path / "a.json"))
    run_script("benchmark_recall", *common, "--policies", "sliding-window", "--out", str(tmp_path / "b.json"))
    run_script("benchmark_recall", "--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"),
               "--out", str(tmp_path / "all.json"))
    merged = json.loads((tmp_path / "all.json").read_text())
    assert merged["settings"]["policies"] == ["full", "uniform", "sliding-window"]
    assert [(r["policy"], r["budget"]) for r in merged["runs"]] == [
        ("full", None), ("uniform", "1/4"), ("uniform", "1/2"), ("sliding-window", "1/4"), ("sliding-window", "1/2")]
    assert (tmp_path / "all.png").stat().st_size > 10_000
    # The same policy and budget with kept positions is another run, not a duplicate.
    run_script("benchmark_recall", *common, "--policies", "uniform", "--positions", "keep",
               "--out", str(tmp_path / "k.json"))
    run_script("benchmark_recall", "--merge", str(tmp_path / "a.json"), str(tmp_path / "k.json"),
               "--out", str(tmp_path / "ak.json"))
    assert [(r["policy"], r["budget"], r["positions"]) for r in json.loads((tmp_path / "ak.json").read_text())["runs"]
            if r["policy"] == "uniform"] == [("uniform", "1/4", "reindex"), ("uniform", "1/2", "reindex"),
                                             ("uniform", "1/4", "keep"), ("uniform", "1/2", "keep")]
    # Other streams cannot be merged in: the comparison would not be question by question.
    run_script("benchmark_recall", *common, "--seed", "5", "--policies", "random", "--out", str(tmp_path / "c.json"))
    refused = subprocess.run([sys.executable, "-m", "scripts.benchmark_recall", "--merge",
                              str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "x.json")],
                             capture_output=True, text=True, timeout=wall_s(60), cwd=ROOT)
    assert refused.returncode != 0 and "ran other streams or settings" in refused.stderr
    assert "seed" in refused.stderr and "Traceback" not in refused.stderr
    # Nor a run of another trained projector, though its file has the same name.
    other = json.loads((tmp_path / "b.json").read_text())
    other["settings"]["mmproj_sha256"] = "0" * 16
    (tmp_path / "o.json").write_text(json.dumps(other))
    refused = subprocess.run([sys.executable, "-m", "scripts.benchmark_recall", "--merge",
                              str(tmp_path / "a.json"), str(tmp_path / "o.json"), "--out", str(tmp_path / "x.json")],
                             capture_output=True, text=True, timeout=wall_s(60), cwd=ROOT)
    assert refused.returncode != 0 and "mmproj_sha256" in refused.stderr
    # Single-turn answers are another measurement: not merged with multi-turn ones.
    run_script("benchmark_recall", *common, "--turns", "single", "--policies", "random",
               "--out", str(tmp_path / "s.json"))
    assert json.loads((tmp_path / "s.json").read_text())["settings"]["turns"] == "single"
    mixed = subprocess.run([sys.executable, "-m", "scripts.benchmark_recall", "--merge",
                            str(tmp_path / "a.json"), str(tmp_path / "s.json"), "--out", str(tmp_path / "x.json")],
                           capture_output=True, text=True, timeout=wall_s(60), cwd=ROOT)
    assert mixed.returncode != 0 and "(turns)" in mixed.stderr
    twice = subprocess.run([sys.executable, "-m", "scripts.benchmark_recall", "--merge",
                            str(tmp_path / "a.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "x.json")],
                           capture_output=True, text=True, timeout=wall_s(60), cwd=ROOT)
    assert twice.returncode != 0 and "full is in more than one result" in twice.stderr
