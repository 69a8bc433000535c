"""`edge-runtime serve` under load, on loopback: 4 synthetic streams (1 frame/s, as live cameras) on one model,
8 clients asking streamed questions (OpenAI's chat completions, a few seconds apart, as people do), for a set
time. Records per stream the frames/s it kept up, time to first token p50/p95, errors (target 0), the
server's memory over time (RSS and PSS, read from /proc), and what the one loaded model saves against 4
separate processes watching one stream each (run after, for a minute, PSS summed: shared pages counted once).

    python -m scripts.load_serve --seconds 300 --out results/serve_load.json    # a PNG is written beside it
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from scripts.bench import machine_info, save_figure
from scripts.page_screenshot import free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the scene?", "What came in last?", "How many objects are there?", "Is anything moving?"]
WARMUP_S = 60.0  # memory is judged after this: every stream's first pass has run


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MiB, from /proc: PSS shares the mapped model's pages among its users."""
    rss = pss = 0.0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) / 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) / 1024
    return rss, pss


def client(url: str, names: list[str], deadline: float, seed: int, log: list[dict], stop: threading.Event) -> None:
    """One person with a phone: a question to one of the streams, streamed, then a few seconds of thought."""
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as http:
        while time.monotonic() < deadline and not stop.is_set():
            name = rng.choice(names)
            t0 = time.monotonic()
            entry: dict = {"stream": name, "t": t0, "ok": False}
            try:
                with http.stream("POST", "/v1/chat/completions", json={
                        "model": name, "stream": True, "max_tokens": 24,
                        "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}]}) as r:
                    if r.status_code != 200:
                        entry["error"] = f"HTTP {r.status_code}: {r.read()[:200]!r}"
                    else:
                        for line in r.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            data = json.loads(line[6:])
                            if "error" in data:
                                entry["error"] = data["error"]["message"]
                                break
                            if data["choices"][0]["delta"].get("content") and "ttft_ms" not in entry:
                                entry["ttft_ms"] = (time.monotonic() - t0) * 1e3
                        entry["ok"] = "error" not in entry
            except httpx.HTTPError as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            entry["total_ms"] = (time.monotonic() - t0) * 1e3
            log.append(entry)
            stop.wait(rng.uniform(2.0, 5.0))


def frames_of(url: str) -> dict[str, int]:
    data = httpx.get(url + "/v1/streams", timeout=30).json()["data"]
    return {s["name"]: (s["status"] or {}).get("frames", 0) for s in data}


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--budget", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--separate-seconds", type=float, default=90.0, help="how long the 4 separate processes run")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "serve_load.json")
    args = p.parse_args()
    names = [f"cam{i}" for i in range(args.streams)]
    common = ["--realtime", "--fps", "1", "--budget", str(args.budget), "--threads", str(args.threads)]

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([a for i, n in enumerate(names) for a in ("--stream", f"{n}=synthetic:{i + 1}")]
                          + common, port)
    asked: list[dict] = []
    samples: list[dict] = []
    stop = threading.Event()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    clients = [threading.Thread(target=client, args=(url, names, deadline, k, asked, stop), daemon=True)
               for k in range(args.clients)]
    for c in clients:
        c.start()
    start_frames = frames_of(url)
    try:
        with tqdm(total=int(args.seconds), desc="load", unit="s", mininterval=5.0) as bar:
            while (now := time.monotonic()) < deadline:
                rss, pss = memory_mb(server.pid)
                samples.append({"t": round(now - t0, 1), "rss_mb": round(rss, 1), "pss_mb": round(pss, 1),
                                "frames": frames_of(url)})
                bar.update(int(now - t0) - bar.n)
                time.sleep(2.0)
        for c in clients:
            c.join(150)
        end_frames = frames_of(url)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        server.terminate()
        server.wait(60)

    late = [s for s in samples if s["t"] >= WARMUP_S]
    server_pss = statistics.median(s["pss_mb"] for s in late) if late else None
    separate = separate_processes(names, common, args.separate_seconds)

    per_stream = {}
    for n in names:
        mine = [a for a in asked if a["stream"] == n]
        ttft = [a["ttft_ms"] for a in mine if "ttft_ms" in a]
        per_stream[n] = {"frames_per_s": round((end_frames[n] - start_frames[n]) / elapsed, 3),
                         "questions": len(mine), "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95)}
    ttft_all = [a["ttft_ms"] for a in asked if "ttft_ms" in a]
    errors = [a for a in asked if not a["ok"]]
    rss_late = [s["rss_mb"] for s in late]
    result = {
        "what": f"{args.streams} synthetic streams at 1 frame/s on one edge-vlm, {args.clients} clients asking "
                "streamed questions 2-5 s apart, on loopback",
        "machine": machine_info(),
        "settings": vars(args) | {"out": str(args.out)},
        "seconds": round(elapsed, 1),
        "questions": len(asked),
        "errors": len(errors),
        "error_examples": [e.get("error") for e in errors[:5]],
        "ttft_ms": {"p50": pct(ttft_all, 50), "p95": pct(ttft_all, 95)},
        "streams": per_stream,
        "server_memory_after_warmup": {
            "rss_mb": {"min": min(rss_late), "max": max(rss_late),
                       "slope_mb_per_hour": round(float(np.polyfit([s["t"] / 3600 for s in late], rss_late, 1)[0]),
                                                  1)} if len(late) > 2 else None,
            "pss_mb_median": server_pss},
        "separate_processes": separate,
        "saved_mb": round(separate["pss_mb_sum"] - server_pss, 1) if separate and server_pss else None,
        "series": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("questions", "errors", "ttft_ms", "streams", "saved_mb")}, indent=1))
    return 0 if not errors else 1


def separate_processes(names: list[str], common: list[str], seconds: float) -> dict:
    """The same streams, one `edge-runtime serve` process each (the model loaded in every one)."""
    servers = []
    try:
        for i, n in enumerate(names):
            servers.append(start_server(["--stream", f"{n}=synthetic:{i + 1}", *common], free_port()))
        time.sleep(seconds)
        each = [memory_mb(s.pid) for s in servers]
    finally:
        for s in servers:
            s.terminate()
        for s in servers:
            s.wait(60)
    return {"processes": len(names), "seconds": seconds, "rss_mb_each": [round(r, 1) for r, _ in each],
            "pss_mb_each": [round(p, 1) for _, p in each], "pss_mb_sum": round(sum(p for _, p in each), 1)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["series"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    t = [x["t"] for x in s]
    axes[0].plot(t, [x["rss_mb"] for x in s], label="server RSS (MB)")
    axes[0].plot(t, [x["pss_mb"] for x in s], label="server PSS (MB)")
    if result["separate_processes"]:
        axes[0].axhline(result["separate_processes"]["pss_mb_sum"], color="C3", ls="--",
                        label="4 separate processes, PSS summed")
    for name in result["streams"]:
        axes[1].plot(t, [x["frames"].get(name, 0) for x in s], label=f"{name} frames")
    axes[1].set_xlabel("seconds")
    axes[0].set_title(f"serve under load: {result['questions']} questions, {result['errors']} errors, "
                      f"TTFT p50 {result['ttft_ms']['p50']} ms, p95 {result['ttft_ms']['p95']} ms")
    save_figure(fig, list(axes), path)


if __name__ == "__main__":
    sys.exit(main())
