"""The service soak: `edge-runtime` as a device runs it, for an hour, with the faults of a device on a shelf.

An IP camera on loopback (scripts/mjpeg_server.py: the synthetic world as MJPEG over HTTP, a new scene frame
every second) is watched by the CLI, started as a service would start it: `--url`, a capped memory
(`--budget`, InfiniPot-V), checkpoints on (`--memory-dir`, at the default interval), JSON events on stdout. A
question goes to its stdin every 5 s. The camera is taken off the network several times (for 5 s to 60 s);
half-way the process is stopped with SIGTERM and started again on the same memory directory, as systemd
would after an update. Everything is read from the CLI's own events:

- RSS per status event (flat after the warm-up: the first pass and the first checkpoint), video tokens;
- every checkpoint's write time and size, and their share of the stream's wall time;
- every drop and return, and the seconds until the camera's frames came back;
- answers against questions asked, and errors (error events, refused questions, failed checkpoints,
  tracebacks, exit codes other than 0).

    python -m scripts.soak --minutes 60 --out results/soak_1h.json     # a PNG is written beside the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from scripts.bench import machine_info, save_figure
from scripts.mjpeg_server import synthetic_camera

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the scene?", "How many objects are there?", "What came in last?", "Is anything moving?"]
# (minute of the soak, seconds down), scaled to --minutes: short blips, a router reboot, a long outage
DROPS = [(0.12, 5.0), (0.27, 20.0), (0.62, 60.0), (0.85, 10.0)]
RESTART_AT = 0.45  # SIGTERM and start again, on the same memory directory
WARMUP_S = 300.0  # RSS is judged after this: the first passes and checkpoints allocate what they keep


class Run:
    """One CLI process: its events (with the soak's clock), stderr, exit code."""

    def __init__(self, argv: list[str], clock0: float) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.clock0 = clock0
        self.events: list[dict] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._read_events, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_events(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = {"event": "unparsed", "line": line.rstrip()}
            event["t"] = round(time.monotonic() - self.clock0, 3)
            self.events.append(event)

    def _read_stderr(self) -> None:
        assert self.proc.stderr
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def ask(self, question: str) -> bool:
        try:
            assert self.proc.stdin
            self.proc.stdin.write(question + "\n")
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError):
            return False

    def stop(self, timeout: float = 120.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        for t in self._threads:
            t.join(10)
        return rc


def summarise_run(run: Run, rc: int) -> dict:
    evs = run.events
    statuses = [e for e in evs if e["event"] == "status"]
    late = [e for e in statuses if e["t"] - statuses[0]["t"] >= WARMUP_S] if statuses else []
    rss = [e["rss_mb"] for e in late]
    slope = float(np.polyfit([e["t"] / 3600 for e in late], rss, 1)[0]) if len(late) > 10 else None
    return {
        "exit_code": rc,
        "frames": statuses[-1]["frames"] if statuses else 0,
        "first_frames": statuses[0]["frames"] if statuses else None,
        "passes": statuses[-1]["passes"] if statuses else 0,
        "rss_mb_after_warmup": {"min": min(rss), "max": max(rss), "slope_mb_per_hour": slope} if rss else None,
        "peak_rss_mb": max((e["peak_rss_mb"] for e in statuses), default=None),
        "video_tokens_max": max((e["video_tokens"] for e in statuses), default=0),
        "kv_bytes_after_warmup": sorted({e["kv_bytes"] for e in late})[-3:] if late else [],
        "restored": next((e["message"] for e in evs if e["event"] == "notice"
                          and e["message"].startswith("restored")), None),
        "tracebacks": sum("Traceback" in line for line in run.stderr),
        "stderr_tail": run.stderr[-5:],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--ask-every", type=float, default=5.0, help="seconds between questions")
    p.add_argument("--seed", type=int, default=11, help="the synthetic scene the camera shows")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--memory-dir", type=Path, help="default: a temporary directory")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "soak_1h.json")
    p.add_argument("--events", type=Path, help="also write every event of the CLI here (JSON lines)")
    args = p.parse_args()
    total = args.minutes * 60

    memory_dir = args.memory_dir or Path(tempfile.mkdtemp(prefix="edge-soak-"))
    camera = synthetic_camera(args.seed, fps=5.0, camera_fps=1.0).start()
    argv = [sys.executable, "-m", "edge_runtime", "--url", camera.url, "--fps", "1", "--timeout", "5",
            "--budget", str(args.budget), "--threads", str(args.threads), "--memory-dir", str(memory_dir),
            "--max-answer-tokens", "24", "--json"]
    clock0 = time.monotonic()
    drops = [(f * total, s) for f, s in DROPS]
    down_until: float | None = None
    drop_log: list[dict] = []
    runs: list[tuple[Run, int | None]] = [(Run(argv, clock0), None)]
    restarted = False
    asked = 0
    next_question = 30.0  # after the model has loaded
    with tqdm(total=int(total), desc="soak", unit="s", mininterval=5.0) as bar:
        while (now := time.monotonic() - clock0) < total:
            run = runs[-1][0]
            if drops and now >= drops[0][0] and down_until is None:
                start, seconds = drops.pop(0)
                camera.stop()
                down_until = now + seconds
                drop_log.append({"at_s": round(now, 1), "down_s": seconds})
            if down_until is not None and now >= down_until:
                camera.start()
                drop_log[-1]["restarted_at_s"] = round(now, 1)
                down_until = None
            if not restarted and now >= RESTART_AT * total:
                runs[-1] = (run, run.stop())
                runs.append((Run(argv, clock0), None))
                restarted = True
                continue
            if now >= next_question:
                if run.ask(QUESTIONS[asked % len(QUESTIONS)]):
                    asked += 1
                next_question += args.ask_every
            if run.proc.poll() is not None:
                break  # died: recorded below as an exit code
            bar.update(int(now) - bar.n)
            time.sleep(0.2)
    if down_until is not None:
        camera.start()
    runs[-1] = (runs[-1][0], runs[-1][0].stop())
    camera.stop()

    events = [e for run, _ in runs for e in run.events]
    if args.events:
        args.events.write_text("".join(json.dumps(e) + "\n" for e in events))
    notices = [e for e in events if e["event"] == "notice"]
    checkpoints = [e for e in events if e["event"] == "checkpoint"]
    answers = [e for e in events if e["event"] == "answer"]
    for drop in drop_log:  # the first frame after the camera came back
        dropped = next((n for n in notices if "dropped" in n["message"] and n["t"] >= drop["at_s"]), None)
        back = next((n for n in notices if "is back after" in n["message"] and n["t"] >= drop["at_s"]), None)
        drop["drop_notice_at_s"] = dropped and dropped["t"]
        drop["back_notice_at_s"] = back and back["t"]
        drop["recovered"] = back is not None
        if back is not None and "restarted_at_s" in drop:
            drop["seconds_to_recover_after_camera_returned"] = round(back["t"] - drop["restarted_at_s"], 1)
    periodic = [c for c in checkpoints]
    stream_s = sum((run.events[-1]["t"] - run.events[0]["t"]) for run, _ in runs if run.events)
    errors = ([e for e in events if e["event"] in ("error", "unparsed")]
              + [n for n in notices if n["message"].startswith(("question not answered", "checkpoint failed"))])
    per_run = [summarise_run(run, rc if rc is not None else -1) for run, rc in runs]
    result = {
        "what": "edge-runtime --url (loopback MJPEG camera, 1 frame/s) --budget, --memory-dir, a question every "
                f"{args.ask_every:g} s, the camera dropped {len(drop_log)} times, one SIGTERM + restart",
        "machine": machine_info(),
        "settings": {"minutes": args.minutes, "budget": args.budget, "ask_every_s": args.ask_every, "seed": args.seed,
                     "threads": args.threads, "argv": argv[1:]},
        "questions_asked": asked,
        "answers": len(answers),
        "ttft_ms": {"median": statistics.median(a["ttft_ms"] for a in answers),
                    "max": max(a["ttft_ms"] for a in answers)} if answers else None,
        "errors": len(errors) + sum(r["tracebacks"] for r in per_run) + sum(r["exit_code"] != 0 for r in per_run),
        "error_events": errors[:20],
        "drops": drop_log,
        "checkpoints": {
            "count": len(periodic),
            "seconds": {"median": statistics.median(c["seconds"] for c in periodic),
                        "max": max(c["seconds"] for c in periodic)} if periodic else None,
            "bytes": {"median": statistics.median(c["bytes"] for c in periodic),
                      "max": max(c["bytes"] for c in periodic)} if periodic else None,
            "share_of_stream_time": sum(c["seconds"] for c in periodic) / stream_s if stream_s else None,
            "each": [{k: c[k] for k in ("t", "seconds", "bytes", "frames")} for c in checkpoints],
        },
        "runs": per_run,
        "series": [{k: e[k] for k in ("t", "frames", "video_tokens", "kv_bytes", "rss_mb", "passes")}
                   for e in events if e["event"] == "status"][::10],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("questions_asked", "answers", "errors")}
                     | {"checkpoint_share": result["checkpoints"]["share_of_stream_time"],
                        "recovered": [d["recovered"] for d in drop_log],
                        "rss": [r["rss_mb_after_warmup"] for r in per_run]}, indent=1))
    ok = (result["errors"] == 0 and all(d["recovered"] for d in drop_log)
          and all(r["rss_mb_after_warmup"] and r["rss_mb_after_warmup"]["max"] - r["rss_mb_after_warmup"]["min"] < 50
                  for r in per_run))
    return 0 if ok else 1


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    t = [s["t"] / 60 for s in series]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(t, [s["rss_mb"] for s in series], label="RSS (MB)")
    axes[1].plot(t, [s["video_tokens"] for s in series], label="video tokens in memory", color="C1")
    each = result["checkpoints"]["each"]
    axes[2].plot([c["t"] / 60 for c in each], [c["seconds"] for c in each], "o", label="checkpoint write (s)",
                 color="C2")
    for ax in axes:
        for drop in result["drops"]:
            ax.axvspan(drop["at_s"] / 60, drop.get("restarted_at_s", drop["at_s"]) / 60, color="red", alpha=0.15)
    axes[2].set_xlabel("minutes (red: camera off the network)")
    axes[0].set_title(f"soak: {result['settings']['minutes']:g} min, {result['answers']} answers, "
                      f"{result['errors']} errors, {sum(d['recovered'] for d in result['drops'])}/"
                      f"{len(result['drops'])} drops recovered")
    save_figure(fig, list(axes), path)


if __name__ == "__main__":
    sys.exit(main())
