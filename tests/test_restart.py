"""`edge-runtime --memory-dir` as a service runs it: stopped by SIGTERM (exit 0, last checkpoint) and started
again, it goes on with the memory of before, bit for bit the memory of a run that never stopped; a checkpoint
made otherwise is refused in one line; one directory has one writer; a camera that drops comes back."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import CMD, events, models
from wallclock import wall_s

from edge_runtime.checkpoint import NEWEST, PREVIOUS, read_checkpoint
from scripts.mjpeg_server import synthetic_camera

STREAM = ["--synthetic", "3", "--budget", "64", "--json"]  # 16 tokens a frame: a pass every couple of frames


def memory_of(directory: Path) -> tuple[bytes, tuple[bytes, ...], dict]:
    """What a checkpoint holds of the memory: llama.cpp's state, the slot tables, the bookkeeping."""
    ckpt = read_checkpoint(directory / NEWEST)
    return bytes(ckpt.state), tuple(t.tobytes() for t in ckpt.tables), ckpt.meta["memory"]


def start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(proc: subprocess.Popen, until, limit_s: float = 60.0) -> list[dict]:
    """Events from a running CLI up to the first for which until(event) holds."""
    assert proc.stdout
    seen, deadline = [], time.monotonic() + wall_s(limit_s)
    for line in proc.stdout:
        seen.append(json.loads(line))
        if until(seen[-1]):
            return seen
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"not seen in time; events {seen[-5:]}, stderr {proc.stderr.read() if proc.stderr else ''}")


def test_stopped_by_sigterm_and_restarted_it_ends_in_the_memory_of_a_run_that_never_stopped(
        fixtures: dict[str, Path], tmp_path: Path) -> None:
    argv = [*CMD, *STREAM, *models(fixtures), "--max-frames", "24"]
    whole = subprocess.run([*argv, "--memory-dir", str(tmp_path / "whole")], capture_output=True, text=True,
                           timeout=wall_s(120), stdin=subprocess.DEVNULL)
    assert whole.returncode == 0, whole.stderr

    proc = start([*argv, "--memory-dir", str(tmp_path / "cut")])
    try:
        wait_for(proc, lambda e: e["event"] == "status" and e["frames"] >= 9)
        proc.send_signal(signal.SIGTERM)  # what systemd sends to stop a service
        rest, err = proc.communicate(timeout=wall_s(60))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err  # a clean stop
    first = events(rest)
    assert "stopped by SIGTERM" in " ".join(e.get("message", "") for e in first if e["event"] == "notice")
    saved = next(e for e in first if e["event"] == "checkpoint")["frames"]
    assert 9 <= saved < 24 and first[-1]["event"] == "summary" and first[-1]["frames"] == saved
    assert "Traceback" not in err

    again = subprocess.run([*argv, "--memory-dir", str(tmp_path / "cut")], capture_output=True, text=True,
                           timeout=wall_s(120), stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    evs = events(again.stdout)
    restored = next(e for e in evs if e["event"] == "notice")["message"]
    assert restored.startswith("restored the memory of") and f"{saved} frames seen" in restored, restored
    statuses = [e for e in evs if e["event"] == "status"]
    assert statuses[0]["frames"] == saved + 1 and statuses[-1]["frames"] == 24  # it went on where it stopped
    assert memory_of(tmp_path / "cut") == memory_of(tmp_path / "whole")  # the same memory, bit for bit

    # Restarted with another budget: refused in one line that says what differs, the checkpoints untouched.
    files = {p: p.read_bytes() for p in (tmp_path / "cut").glob("*.ckpt")}
    other = subprocess.run([*argv[:-2], "--max-frames", "30", "--memory-dir", str(tmp_path / "cut"),
                            "--budget", "96"], capture_output=True, text=True, timeout=wall_s(60),
                            stdin=subprocess.DEVNULL)
    assert other.returncode == 2
    line = other.stderr.strip().splitlines()
    assert len(line) == 1 and "with budget 64, this session has 96" in line[0], other.stderr
    assert files == {p: p.read_bytes() for p in (tmp_path / "cut").glob("*.ckpt")}
    assert {p.name for p in files} == {NEWEST, PREVIOUS}


def test_one_memory_directory_has_one_writer(fixtures: dict[str, Path], tmp_path: Path) -> None:
    argv = [*CMD, "--synthetic", "--realtime", "--fps", "5", *models(fixtures), "--json",
            "--memory-dir", str(tmp_path / "mem")]
    proc = start(argv)
    try:
        wait_for(proc, lambda e: e["event"] == "status")
        second = subprocess.run(argv, capture_output=True, text=True, timeout=wall_s(60), stdin=subprocess.DEVNULL)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another edge-runtime (pid {proc.pid})" in lines[0], second.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=wall_s(60))
    assert proc.returncode == 0


@pytest.mark.parametrize("with_memory_dir", [False, True])
def test_a_camera_that_drops_twice_comes_back_and_the_stream_goes_on(
        fixtures: dict[str, Path], tmp_path: Path, with_memory_dir: bool) -> None:
    with synthetic_camera(seed=2, fps=10.0) as camera:
        argv = [*CMD, "--url", camera.url, "--fps", "4", "--timeout", "2", "--budget", "64", *models(fixtures),
                "--json", "--max-frames", "30", "--ask", "What is there?"]
        if with_memory_dir:
            argv += ["--memory-dir", str(tmp_path / "mem"), "--checkpoint-every", "0.5"]
        proc = start(argv)
        try:
            seen = []
            for drop in range(2):
                seen += wait_for(proc, lambda e, n=6 + 10 * drop: e["event"] == "status" and e["frames"] >= n)
                camera.stop()
                seen += wait_for(proc, lambda e: e["event"] == "notice")
                time.sleep(2.5)  # down: the reconnects in between are refused
                camera.start()
                seen += wait_for(proc, lambda e: e["event"] == "notice")
            rest, err = proc.communicate(timeout=wall_s(60))
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, err
    evs = seen + events(rest)
    notices = [e["message"] for e in evs if e["event"] == "notice"]
    assert sum("dropped" in n for n in notices) == 2 and sum("is back after" in n for n in notices) == 2, notices
    statuses = [e for e in evs if e["event"] == "status"]
    assert [s["frames"] for s in statuses] == list(range(1, 31))  # nothing lost, nothing counted twice
    assert max(s["video_tokens"] for s in statuses) <= 64  # the memory was kept, within its budget
    answer = next(e for e in evs if e["event"] == "answer")
    assert answer["frames"] == 30
    if with_memory_dir:
        assert sum(e["event"] == "checkpoint" for e in evs) >= 3  # saving went on across the drops
        assert read_checkpoint(tmp_path / "mem" / NEWEST).meta["frames_seen"] == 30
