"""Memory, speed and latency of a long stream, per policy, side by side: the full cache against the capped ones.

Each run streams the same synthetic frames through one model with one policy, in its own process (so that
peak RSS, read from the OS, is that run's alone), and records per frame: video tokens in the cache, KV
bytes, process RSS, ingest time (projector encode and language-model decode apart) and compression time.
Every tenth of the stream it asks a fixed question and records time to first token and decode speed.

    python -m scripts.benchmark_memory --frames 3600 --out results/memory_1h.json    # the one-hour stream

The service as a whole (a camera that drops, checkpoints, restarts, a question every 5 s) has its own soak:
scripts/soak.py.

The JSON holds the settings, the machine, per-run series and summaries; a PNG beside it plots memory
against stream length and per-frame latency.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import MemoryFull, make_policy
from edge_runtime.session import Session, SessionConfig, rss_mb
from edge_runtime.sources import SyntheticSource
from scripts.bench import FRAME_SIZE, add_model_arguments, check_model_arguments, machine_info, save_figure

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What has happened in the video so far?"
DEFAULT_RUNS = "full,sliding-window@4096,infinipot-v@4096,infinipot-v@2048"
FULL_CTX = 8192  # the full cache gets what a plain llama.cpp user would allocate for this model


def gpu_mb() -> tuple[float, str] | None:
    """This process's GPU memory as nvidia-smi reports it, and what the figure covers: "process", or "device"
    (the whole GPU's used memory) where a container hides the process list. None without an NVIDIA GPU."""
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--format=csv,noheader,nounits"]
    out = subprocess.run([*query, "--query-compute-apps=pid,used_memory"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        pid, _, used = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(used), "process"
    out = subprocess.run([*query, "--query-gpu=memory.used"], capture_output=True, text=True, check=False).stdout
    return (float(out.split()[0]), "device") if out.split() else None


def make_session(args: argparse.Namespace, policy: str, budget: int | None) -> Session:
    # same question, same prompt; a capped context is sized for its budget
    config = SessionConfig(n_ctx=None if budget else FULL_CTX, budget=budget, history_tokens=0, max_answer_tokens=16)
    model = VisionLanguageModel(ModelConfig(args.model, args.mmproj, n_threads=args.threads))
    return Session(model, config, make_policy(policy, seed=args.seed))


def run_one(args: argparse.Namespace, policy: str, budget: int | None, position: int) -> dict:
    """One policy over the whole stream, in this process."""
    session = make_session(args, policy, budget)
    ask_every = args.ask_every or max(1, args.frames // 10)
    series: dict[str, list[float]] = {k: [] for k in ("video_tokens", "kv_bytes", "rss_mb", "prepare_ms",
                                                      "encode_ms", "decode_ms", "compress_ms")}
    questions = []
    gpu = []  # [frame, MB] samples of this process's GPU memory, a hundred over the stream
    gpu_source = None  # what the samples cover (gpu_mb)
    gpu_every = max(1, args.frames // 100)
    pass_paths: set[str] = set()  # direct, graph or portable (see compressor.PassReport)
    stopped_at = cut_at = None
    t_start = time.perf_counter()
    label = f"{policy}@{budget}" if budget else policy
    source = SyntheticSource(seed=args.seed, fps=args.fps, n_frames=args.frames, size=FRAME_SIZE)
    for frame in tqdm(source, total=args.frames,
                      desc=f"{label:>20}", unit="frame", position=position, leave=True, mininterval=2.0):
        try:
            _, timing = session.insert_frame(frame)
        except MemoryFull:
            stopped_at = session.frames_seen  # where plain llama.cpp stops: the context is full
            break
        series["video_tokens"].append(session.memory.video_tokens)
        series["kv_bytes"].append(session.context.state_size())
        series["rss_mb"].append(round(rss_mb()[0], 1))
        for key in ("prepare_ms", "encode_ms", "decode_ms", "compress_ms"):
            series[key].append(round(getattr(timing, key), 2))
        if timing.compress_ms > 0:
            pass_paths.add(session.compressor.last.path)
        if session.frames_seen % ask_every == 0:
            answer = session.ask(QUESTION)
            questions.append({"frame": session.frames_seen, "ttft_ms": round(answer.ttft_ms, 1),
                              "tokens_per_s": round(answer.tokens_per_s, 1), "n_tokens": answer.n_tokens,
                              "answer": answer.text})
        if session.frames_seen % gpu_every == 0 and (used := gpu_mb()) is not None:
            gpu.append([session.frames_seen, used[0]])
            gpu_source = used[1]
        if args.max_wall_s and time.perf_counter() - t_start > args.max_wall_s:
            cut_at = session.frames_seen  # out of time (a lent GPU's minutes): report what was measured
            break
    wall_s = time.perf_counter() - t_start
    frames = session.frames_seen
    ingest = [p + e + d for p, e, d in zip(series["prepare_ms"], series["encode_ms"], series["decode_ms"],
                                           strict=True)]
    compress = [c for c in series["compress_ms"] if c > 0]
    first_pass = next((i for i, c in enumerate(series["compress_ms"]) if c > 0), None)
    kv_end = series["kv_bytes"][-1]
    cells_end = session.memory.prefix_tokens + session.memory.video_tokens
    # what the full cache would hold after this stream: every frame's tokens, at this model's bytes per cell
    full_need = kv_end / cells_end * (session.memory.prefix_tokens + session.memory.tokens_per_frame * frames)
    minute5 = int(5 * 60 * args.fps)
    rss_after_5 = series["rss_mb"][minute5:] if len(series["rss_mb"]) > minute5 else []
    summary = {
        "frames": frames,
        "stopped_at_frame": stopped_at,
        "cut_at_frame": cut_at,  # --max-wall-s ended the stream here (None: it ran to the end)
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_growth_after_minute_5": (round(max(rss_after_5) / rss_after_5[0] - 1, 4) if rss_after_5 else None),
        "rss_mb_after_minute_5": [min(rss_after_5), max(rss_after_5)] if rss_after_5 else None,
        "gpu_mb_after_minute_5": ([min(m for f, m in gpu if f > minute5), max(m for f, m in gpu if f > minute5)]
                                  if any(f > minute5 for f, _ in gpu) else None),
        "gpu_mb_covers": gpu_source,
        "video_tokens_after_first_pass": ([min(series["video_tokens"][first_pass:]),
                                           max(series["video_tokens"][first_pass:])] if first_pass else None),
        "pass_paths": sorted(pass_paths),
        "questions_answered": sum(1 for q in questions if q["n_tokens"] > 0),
        "questions": len(questions),
        "kv_mb_at_end": round(kv_end / 2**20, 2),
        "kv_mb_full_cache_would_need": round(full_need / 2**20, 1),
        "kv_fraction_of_full_cache": round(kv_end / full_need, 4),
        "ingest_ms_median": round(statistics.median(ingest), 1),
        "encode_ms_median": round(statistics.median(series["encode_ms"]), 1),
        "decode_ms_median": round(statistics.median(series["decode_ms"]), 1),
        "compress_ms_median": round(statistics.median(compress), 1) if compress else 0.0,
        "passes": len(compress),
        "compress_overhead": round(sum(compress) / sum(ingest), 4),
        "ttft_ms_median": round(statistics.median(q["ttft_ms"] for q in questions), 1) if questions else None,
        "ttft_ms_first_last": [questions[0]["ttft_ms"], questions[-1]["ttft_ms"]] if questions else None,
        "frames_per_s": round(frames / wall_s, 3),
        "wall_s": round(wall_s, 1),
    }
    session.model.close()
    return {"policy": policy, "budget": budget, "summary": summary, "questions": questions, "series": series,
            "gpu_mb": gpu, "use_gpu": session.model.config.use_gpu}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_rss, ax_lat) = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    fps = result["settings"]["fps"]
    for run in result["runs"]:
        label = f"{run['policy']} |M|={run['budget']}" if run["budget"] else "full cache (plain llama.cpp)"
        minutes = [(i + 1) / fps / 60 for i in range(len(run["series"]["kv_bytes"]))]
        ax_mem.plot(minutes, [b / 2**20 for b in run["series"]["kv_bytes"]], label=label)
        ax_rss.plot(minutes, run["series"]["rss_mb"], label=label)
        ingest = [p + e + d for p, e, d in zip(run["series"]["prepare_ms"], run["series"]["encode_ms"],
                                               run["series"]["decode_ms"], strict=True)]
        ax_lat.plot(minutes, ingest, label=f"{label}: ingest", linewidth=0.6)
        if run["summary"]["stopped_at_frame"]:
            ax_mem.axvline(run["summary"]["stopped_at_frame"] / fps / 60, color="grey", linestyle=":")
            ax_mem.annotate("context full: stops", (run["summary"]["stopped_at_frame"] / fps / 60, 0),
                            rotation=90, va="bottom", fontsize=8)
    ax_mem.set_ylabel("KV cache (MB)")
    ax_rss.set_ylabel("process RSS (MB)")
    ax_lat.set_ylabel("ingest per frame (ms)")
    ax_lat.set_xlabel(f"stream length (minutes at {fps:g} frame/s)")
    ax_mem.set_title(f"{result['settings']['model']}, {result['settings']['tokens_per_frame']} tokens a frame, "
                     f"{result['machine']['cores']} cores")
    save_figure(fig, [ax_mem, ax_rss, ax_lat], path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, ROOT / "fixtures")
    p.add_argument("--frames", type=int, default=600, help="frames to stream (3600 at 1 frame/s: one hour)")
    p.add_argument("--fps", type=float, default=1.0, help="stream time per frame, for the time axis")
    p.add_argument("--runs", default=DEFAULT_RUNS, help=f"policy[@budget],... (default {DEFAULT_RUNS})")
    p.add_argument("--ask-every", type=int, metavar="FRAMES", help="ask the question every FRAMES frames "
                   "(default: every tenth of the stream)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-wall-s", type=float, default=0, metavar="SECONDS",
                   help="end each run's stream after this long and report it as cut there (default: no limit)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "memory.json")
    p.add_argument("--one", metavar="POLICY@BUDGET", help=argparse.SUPPRESS)  # a child process: one run
    p.add_argument("--position", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    check_model_arguments(args)
    if args.one:
        policy, _, budget = args.one.partition("@")
        args.out.write_text(json.dumps(run_one(args, policy, int(budget) if budget else None, args.position)))
        return 0

    runs = []
    for i, spec in enumerate(args.runs.split(",")):
        part = args.out.with_suffix(f".part{i}.json")
        cmd = [sys.executable, __file__, "--one", spec, "--position", "0", "--model", str(args.model),
               "--mmproj", str(args.mmproj), "--frames", str(args.frames), "--fps", str(args.fps),
               "--threads", str(args.threads), "--seed", str(args.seed), "--max-wall-s", str(args.max_wall_s),
               "--out", str(part)]
        if args.ask_every:
            cmd += ["--ask-every", str(args.ask_every)]
        subprocess.run(cmd, check=True)  # one process per run: its peak RSS is its own
        runs.append(json.loads(part.read_text()))
        part.unlink()
    first = runs[0]
    result = {
        "settings": {"model": Path(str(args.model)).name, "mmproj": args.mmproj.name, "frames": args.frames,
                     "fps": args.fps, "runs": args.runs, "threads": args.threads, "seed": args.seed,
                     "question": QUESTION, "ask_every": args.ask_every or max(1, args.frames // 10),
                     "full_cache_ctx": FULL_CTX,
                     "tokens_per_frame": first["series"]["video_tokens"][0] if first["series"]["video_tokens"] else 0},
        "machine": machine_info(),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result) + "\n")
    plot(result, args.out.with_suffix(".png"))
    for run in runs:
        print(json.dumps({"policy": run["policy"], "budget": run["budget"], **run["summary"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
