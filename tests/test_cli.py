"""The `edge-runtime` command end to end, as a user runs it, on the tiny real models."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from wallclock import wall_s

from edge_runtime import cli
from edge_runtime.sources import Frame, FrameSource, SourceError, SyntheticSource

CMD = [sys.executable, "-m", "edge_runtime"]


def models(fixtures: dict[str, Path], mmproj: str = "mmproj") -> list[str]:
    return ["--model", str(fixtures["model"]), "--mmproj", str(fixtures[mmproj]), "--threads", "2",
            "--max-answer-tokens", "4", "--ctx", "2048"]


def events(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def write_video(path: Path, seconds: int = 5, fps: int = 10) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (96, 64))
    assert writer.isOpened()
    for k in range(seconds * fps):
        image = np.full((64, 96, 3), (k * 5) % 255, np.uint8)
        cv2.circle(image, (10 + k, 32), 8, (0, 0, 255), -1)
        writer.write(image)
    writer.release()
    return path


def test_video_file_to_json_answers_and_statuses(fixtures: dict[str, Path], tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4")
    run = subprocess.run([*CMD, "--video", str(video), *models(fixtures), "--ask", "What moved?",
                          "--ask", "Which colour?", "--json"], capture_output=True, text=True, timeout=wall_s(120))
    assert run.returncode == 0, run.stderr
    evs = events(run.stdout)
    statuses = [e for e in evs if e["event"] == "status"]
    assert [s["frames"] for s in statuses] == [1, 2, 3, 4, 5]  # 5 s of video sampled at 1 frame/s
    assert [s["video_tokens"] for s in statuses] == [16, 32, 48, 64, 80]
    assert all(a["kv_bytes"] < b["kv_bytes"] for a, b in zip(statuses, statuses[1:], strict=False))
    assert all(s["rss_mb"] > 0 for s in statuses)
    answers = [e for e in evs if e["event"] == "answer"]
    assert [a["question"] for a in answers] == ["What moved?", "Which colour?"]
    assert all(isinstance(a["answer"], str) and a["ttft_ms"] > 0 for a in answers)
    assert evs[-1]["event"] == "summary" and evs[-1]["frames"] == 5
    assert "Traceback" not in run.stderr


def test_watch_prompt_asks_every_n_seconds_of_stream(fixtures: dict[str, Path]) -> None:
    run = subprocess.run([*CMD, "--synthetic", "1", "--max-frames", "10", *models(fixtures),
                          "--ask", "Anything new?", "--ask-every", "3", "--json"],
                         capture_output=True, text=True, timeout=wall_s(120))
    assert run.returncode == 0, run.stderr
    answers = [e for e in events(run.stdout) if e["event"] == "answer"]
    # frames at t = 0..9 s: watch answers after t = 3, 6, 9, then the final answer at the end
    assert [a["frames"] for a in answers] == [4, 7, 10, 10]


def test_stdin_questions_are_answered_while_frames_keep_coming(fixtures: dict[str, Path]) -> None:
    # Capped memory: the stream runs until Ctrl-C however slow a loaded machine is (the full cache of the tiny
    # model in 2048 tokens fills after 93 frames, 9 s at 10 frames/s, and would end the stream on its own, exit 0).
    # SIGINT as in a terminal, also when the tests run as a background job (which ignores it, and so would the CLI).
    proc = subprocess.Popen([*CMD, "--synthetic", "--realtime", "--fps", "10", "--budget", "256", *models(fixtures),
                             "--json"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdin and proc.stdout
    try:
        def next_event(kind: str) -> dict:
            for line in proc.stdout:
                ev = json.loads(line)
                if ev["event"] == kind:
                    return ev
            raise AssertionError(f"no {kind} event; stderr: {proc.stderr.read() if proc.stderr else ''}")

        next_event("status")
        proc.stdin.write("What is moving?\n")
        proc.stdin.flush()
        answer = next_event("answer")
        assert answer["question"] == "What is moving?"
        later = next_event("status")
        assert later["frames"] > answer["frames"]  # the stream went on after the answer
        proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean exit with a summary
        rest, err = proc.communicate(timeout=wall_s(30))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == cli.EXIT_INTERRUPTED
    assert events(rest)[-1]["event"] == "summary"
    assert "Traceback" not in err


def test_ctrl_c_inside_the_llama_log_callback_is_remembered_not_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    """ctypes swallows what a callback raises: Ctrl-C there must be kept for the loop, not raised and lost.
    Outside the stream loop Ctrl-C interrupts at once; inside it the first one is remembered (the loop stops at
    its next safe point and saves), a second interrupts at once."""
    from edge_runtime.model import NATIVE_LOG

    class CtrlCWhileWriting:  # the verbose log's stderr: Ctrl-C arrives while llama.cpp is logging
        def write(self, text: str) -> None:
            signal.raise_signal(signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (CI may ignore SIGINT)
    lost: list[object] = []
    monkeypatch.setattr(sys, "unraisablehook", lost.append)  # where ctypes reports what a callback raised
    monkeypatch.setattr(NATIVE_LOG, "verbose", True)
    try:
        with cli.StopSignals() as stops:
            with monkeypatch.context() as m:
                m.setattr(sys, "stderr", CtrlCWhileWriting())
                NATIVE_LOG.callback(2, b"decode: a line\n", None)  # through ctypes, as llama.cpp calls it
            assert stops.requested == "interrupted (Ctrl-C)" and not lost
            with pytest.raises(KeyboardInterrupt):  # raised by the loop once out of the callback
                stops.check()
            stops.requested = None
            with pytest.raises(KeyboardInterrupt):  # outside the loop, Ctrl-C is a KeyboardInterrupt as always
                signal.raise_signal(signal.SIGINT)
            stops.requested = None
            with stops.graceful():
                signal.raise_signal(signal.SIGINT)  # the first: remembered, the loop stops at its next safe point
                assert stops.requested == "interrupted (Ctrl-C)" and not stops.terminated
                with pytest.raises(KeyboardInterrupt):  # the second: at once
                    signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with cli.StopSignals():  # an ignored Ctrl-C (nohup) stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


class DyingCamera(FrameSource):
    """A real source that delivers three frames and then loses its device, as an unplugged camera does."""

    def __init__(self) -> None:
        super().__init__("dying camera")

    def __iter__(self) -> Iterator[Frame]:
        yield from SyntheticSource(seed=2, n_frames=3)
        raise SourceError("camera 0 stopped delivering frames")


def test_a_source_that_dies_keeps_the_memory_queryable(fixtures: dict[str, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = cli.build_parser().parse_args(["--camera", "0", *models(fixtures), "--ask", "What was there?",
                                          "--json"])
    assert cli.run(args, cli.Output(as_json=True), source=DyingCamera()) == 0
    evs = events(capsys.readouterr().out)
    notice = next(e for e in evs if e["event"] == "notice")
    assert "camera 0 stopped delivering frames" in notice["message"]
    answer = next(e for e in evs if e["event"] == "answer")
    assert answer["frames"] == 3 and answer["video_tokens"] == 48


def test_full_memory_stops_the_stream_and_still_answers(fixtures: dict[str, Path]) -> None:
    run = subprocess.run([*CMD, "--synthetic", *models(fixtures)[:-2], "--ctx", "256", "--question-room", "64",
                          "--ask", "What was there?", "--json"], capture_output=True, text=True, timeout=wall_s(120))
    assert run.returncode == 0, run.stderr
    evs = events(run.stdout)
    assert "video memory full after 9 frames" in next(e for e in evs if e["event"] == "notice")["message"]
    assert next(e for e in evs if e["event"] == "answer")["frames"] == 9


# case: (source arguments, --model, --mmproj, what the one line must say)
BAD_INPUT = {
    "missing model": (["--synthetic"], "{tmp}/nope.gguf", "{mmproj}", "text model not found"),
    "garbage model": (["--synthetic"], "{tmp}/garbage.gguf", "{mmproj}", "is not a GGUF file"),
    "truncated model": (["--synthetic"], "{tmp}/truncated.gguf", "{mmproj}", "could not load the text model"),
    "mismatched mmproj": (["--synthetic"], "{model}", "{mmproj_mismatched}",
                          "mismatch between text model (n_embd = 64) and mmproj (n_embd = 32)"),
    "text model as mmproj": (["--synthetic"], "{model}", "{model}", "could not use the mmproj"),
    "missing camera": (["--camera", "99"], "{model}", "{mmproj}", "camera 99"),
    "missing video": (["--video", "{tmp}/nope.mp4"], "{model}", "{mmproj}", "nope.mp4"),
    "corrupt video": (["--video", "{tmp}/garbage.mp4"], "{model}", "{mmproj}", "garbage.mp4"),
    "silent url": (["--url", "http://127.0.0.1:9/live.mp4", "--timeout", "2"], "{model}", "{mmproj}",
                   "127.0.0.1:9"),
    "budget under a frame": (["--synthetic", "--budget", "8"], "{model}", "{mmproj}",
                             "one frame needs 16 tokens but the video memory holds 8"),
    "keep everything": (["--synthetic", "--budget", "128", "--keep", "1"], "{model}", "{mmproj}",
                        "|C| must be smaller than |M|"),
    "alpha out of range": (["--synthetic", "--budget", "128", "--alpha", "1.5"], "{model}", "{mmproj}",
                           "alpha must be in [0, 1]"),
    "policy without budget": (["--synthetic", "--policy", "uniform"], "{model}", "{mmproj}",
                              "--policy uniform needs a memory budget"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_clear_line(case: str, fixtures: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "garbage.gguf").write_bytes(b"not a model at all" * 100)
    (tmp_path / "truncated.gguf").write_bytes(fixtures["model"].read_bytes()[:100_000])
    (tmp_path / "garbage.mp4").write_bytes(b"\x00\x01 not a video" * 1000)
    source, model, mmproj, expected = BAD_INPUT[case]
    names = {"tmp": tmp_path, **fixtures}
    argv = [*CMD, *(a.format(**names) for a in source), "--model", model.format(**names),
            "--mmproj", mmproj.format(**names), "--ask", "hi"]
    t0 = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=wall_s(60))
    assert time.monotonic() - t0 < 30  # a time-out, never a hang
    assert run.returncode == cli.EXIT_ERROR
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("edge-runtime: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize("positions", ["reindex", "keep"])
def test_a_budget_keeps_tokens_flat_over_a_long_stream(fixtures: dict[str, Path], positions: str) -> None:
    run = subprocess.run([*CMD, "--synthetic", "--max-frames", "200", *models(fixtures)[:-2], "--budget", "128",
                          "--positions", positions, "--ask", "What was there?", "--json"],
                         capture_output=True, text=True, timeout=wall_s(120))
    assert run.returncode == 0, run.stderr
    statuses = [e for e in events(run.stdout) if e["event"] == "status"]
    assert len(statuses) == 200
    assert max(s["video_tokens"] for s in statuses) == 128
    assert len({s["kv_bytes"] for s in statuses[100:]}) <= 3  # the same few sizes, over and over
    assert statuses[-1]["passes"] == 96  # 8 frames, then a pass every 2 (128 -> 96 tokens)
    if positions == "reindex":
        assert max(s["next_pos"] for s in statuses) <= statuses[0]["next_pos"] - 16 + 128
    assert next(e for e in events(run.stdout) if e["event"] == "answer")["frames"] == 200


def test_ask_every_without_a_question_is_a_usage_error(fixtures: dict[str, Path]) -> None:
    run = subprocess.run([*CMD, "--synthetic", *models(fixtures), "--ask-every", "5"],
                         capture_output=True, text=True, timeout=wall_s(60))
    assert run.returncode == 2 and "--ask-every needs a question" in run.stderr
    assert "Traceback" not in run.stderr
