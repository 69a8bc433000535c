"""Recall under the cap: how often the model answers checkable questions about a stream, per memory policy.

Each stream (edge_runtime.scenes: objects coming and going in front of a fixed camera) is streamed through
the real runtime once per policy and budget; then its questions (colour, shape, digit, first, last, count,
now) are asked one after another from that one memory, as a user would, each with the earlier turns as
history. Answers are graded by exact match (scenes.grade). The full cache runs uncapped, in a context
sized for the whole stream: the ceiling the compression policies are measured against.

    python -m scripts.benchmark_recall --streams 20 --frames 100 --budget 1/8 --out results/recall.json
    python -m scripts.benchmark_recall --frames 600 --budgets 1/16,1/8,1/4 --policies infinipot-v,sliding-window,uniform

On a machine with several cores, run the policies in separate processes (--threads 1 each, and
OMP_WAIT_POLICY=PASSIVE so that OpenMP does not spin on cores the others need), then merge:

    python -m scripts.benchmark_recall --policies full,infinipot-v ... --out a.json &
    python -m scripts.benchmark_recall --policies sliding-window,uniform ... --out b.json
    python -m scripts.benchmark_recall --merge a.json b.json --out results/recall.json

The full cache must fit the model's trained context (SmolLM2: 8192 tokens, 119 frames of 64 tokens); longer
streams compare the capped policies alone.

A budget is a token count (2048) or a fraction of the stream's video tokens (1/8), rounded to whole frames.
The JSON holds the settings, the machine, per-run accuracy (overall, per question kind, per depth: how far
back the evidence lies) and every question's record; with several budgets a PNG beside it plots accuracy
against budget. The default model is the trained edge-vlm (SmolLM2-135M + models/edge-vlm: mmproj and
LoRA); with --mmproj of a random projector accuracy is near chance: that tests the plumbing, not the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel
from edge_runtime.policies import MemoryFull, SettingsError, policy_from_spec
from edge_runtime.scenes import QUESTION_KINDS, Stream, grade, make_stream
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource
from scripts.bench import add_model_arguments, check_model_arguments, machine_info, save_figure

ROOT = Path(__file__).resolve().parents[1]
TRAINED_MMPROJ = ROOT / "models" / "edge-vlm" / "mmproj.gguf"
DEFAULT_POLICIES = "full,infinipot-v,sliding-window,uniform,random"
# How far back the evidence lies, as a share of the stream: recent, middle, old.
MIN_BUDGET_FRAMES = 3
DEPTH_BUCKETS = (("last 10%", 0.0, 0.1), ("10-50%", 0.1, 0.5), ("50-100%", 0.5, 1.0))


def parse_budget(text: str, stream_tokens: int, tokens_per_frame: int) -> int:
    """Video tokens for a budget given as a count ("2048") or a share of the stream ("1/8").

    Whole frames, and at least three: a pass keeps 3/4 of the budget in whole frames, and InfiniPot-V
    needs two of those (half for the recent frame, half for the rest). Every policy gets the same budget.
    """
    try:
        tokens = int(Fraction(text) * stream_tokens) if "/" in text or "." in text else int(text)
    except (ValueError, ZeroDivisionError):
        sys.exit(f"bad budget {text!r}: give video tokens (2048) or a share of the stream (1/8)")
    return max(MIN_BUDGET_FRAMES, tokens // tokens_per_frame) * tokens_per_frame


def depth_bucket(depth: int, n_frames: int) -> str:
    share = depth / n_frames
    return next(name for name, lo, hi in DEPTH_BUCKETS if lo <= share < hi)


def probe(args: argparse.Namespace) -> dict[str, int]:
    """What sizes the contexts: tokens a frame, the system prompt's tokens, the model's trained context."""
    model = VisionLanguageModel(ModelConfig(args.model, args.mmproj, n_threads=args.threads, lora_path=args.lora))
    try:
        with Session(model, SessionConfig(n_ctx=args.question_room + 1024, question_room=args.question_room)) as s:
            prefix = s.memory.prefix_tokens
        image = make_stream(args.seed, 1).frame(0)
        encoded = model.encode_frame(np.ascontiguousarray(image[..., ::-1]))  # BGR to RGB, as the session does
        model.free_frame(encoded)
        return {"tokens_per_frame": encoded.n_tokens, "prefix_tokens": prefix, "n_ctx_train": model.n_ctx_train}
    finally:
        model.close()


def run(args: argparse.Namespace, policy: str, budget: int | None, n_ctx: int, streams: list[Stream],
        bar: tqdm) -> list[dict]:
    """One policy at one budget over every stream; one model serves them all in turn, a context each."""
    model = VisionLanguageModel(ModelConfig(args.model, args.mmproj, n_threads=args.threads, lora_path=args.lora))
    records = []
    try:
        for i, stream in enumerate(streams):
            config = SessionConfig(n_ctx=n_ctx, budget=budget, question_room=args.question_room,
                                   max_answer_tokens=args.max_answer_tokens, seed=args.seed, positions=args.positions)
            session = Session(model, config, policy_from_spec(policy, seed=args.seed + i))
            for frame in SyntheticSource(stream.seed, stream.n_frames):
                session.insert_frame(frame)
                bar.update()
            # The same questions in the same order for every policy: the ask set is seeded by the stream.
            for q in stream.ask_set(stream.seed, args.questions_per_stream):
                if args.turns == "single":
                    session.history.clear()  # the memory stays; earlier questions and answers go
                answer = session.ask(q.text).text
                records.append({"stream": i, "question": q.text, "kind": q.kind, "truth": q.answer,
                                "answer": answer, "correct": grade(answer, q.answer), "depth": q.depth,
                                "evidence_frame": q.evidence_frame})
    finally:
        model.close()
    return records


def accuracy(records: list[dict]) -> dict[str, float | int | None]:
    n = len(records)
    return {"accuracy": round(sum(r["correct"] for r in records) / n, 4) if n else None, "n": n}


def summarise(records: list[dict], n_frames: int) -> dict:
    return {
        **accuracy(records),
        "per_kind": {kind: accuracy([r for r in records if r["kind"] == kind]) for kind in QUESTION_KINDS},
        "per_depth": {name: accuracy([r for r in records if depth_bucket(r["depth"], n_frames) == name])
                      for name, _, _ in DEPTH_BUCKETS},
    }


def majority_accuracy(records: list[dict]) -> float:
    """Accuracy of answering each kind with its most common true answer: the floor a blind model reaches."""
    best = {kind: Counter(r["truth"] for r in records if r["kind"] == kind).most_common(1)[0][0]
            for kind in {r["kind"] for r in records}}
    return round(sum(r["truth"] == best[r["kind"]] for r in records) / len(records), 4)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    stream_tokens = result["settings"]["frames"] * result["settings"]["tokens_per_frame"]
    def line(run: dict) -> tuple[str, str]:
        return run["policy"], run.get("positions", "reindex")

    for policy, positions in dict.fromkeys(map(line, result["runs"])):
        runs = sorted((r for r in result["runs"] if line(r) == (policy, positions)),
                      key=lambda r: r["budget_tokens"] or 0)
        if policy == "full":
            for run in runs:
                ax.axhline(run["accuracy"], color="black", linestyle="--", label="full cache (uncapped)")
            continue
        shares = [r["budget_tokens"] / stream_tokens for r in runs]
        label = policy if positions == "reindex" else f"{policy}, positions {positions}"
        ax.plot(shares, [r["accuracy"] for r in runs], marker="o", label=label)
    ax.axhline(result["majority_answer_accuracy"], color="grey", linestyle=":", label="most common answer")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("budget |M| (share of the stream's video tokens)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    s = result["settings"]
    ax.set_title(f"{s['model']} + {s['mmproj']}: {s['streams']} streams of {s['frames']} frames", fontsize=9)
    save_figure(fig, [ax], path)


SAME_STREAMS = ("model", "mmproj", "lora", "mmproj_sha256", "lora_sha256", "seed", "streams", "frames",
                "questions_per_stream", "question_room", "max_answer_tokens", "tokens_per_frame", "prefix_tokens",
                "depth_buckets")


def file_digest(path: Path | None) -> str | None:
    """The first 16 hex digits of a file's SHA-256: which trained projector and adapter a result is of (every
    edge-vlm version is called mmproj.gguf and lora.gguf)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path else None


def merge(paths: list[Path]) -> dict:
    """One result from runs over the same streams and questions in several processes (policies split up)."""
    parts = [json.loads(path.read_text()) for path in paths]
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        differ = [k for k in SAME_STREAMS if part["settings"].get(k) != first["settings"].get(k)]
        if part["settings"].get("turns", "multi") != first["settings"].get("turns", "multi"):
            differ.append("turns")
        if differ or part["streams"] != first["streams"]:
            sys.exit(f"benchmark_recall: {path} ran other streams or settings than {paths[0]} "
                     f"({', '.join(differ) or 'streams'}): rerun it with the same ones to merge them")
    # Positions belong to each run (results from before --positions ran reindex, the default).
    runs = [{**run, "positions": run.get("positions", "reindex")} for part in parts for run in part["runs"]]
    ran = [(run["policy"], run["budget"], run["positions"]) for run in runs]
    twice = next((r for r in ran if ran.count(r) > 1), None)
    if twice:
        what = twice[0] + (f" at budget {twice[1]}" if twice[1] else "") + (
            f" with positions {twice[2]}" if twice[2] != "reindex" else "")
        sys.exit(f"benchmark_recall: {what} is in more than one result: merge each run once")
    settings = dict(first["settings"])
    settings.pop("positions", None)
    for key in ("policies", "budgets"):
        settings[key] = list(dict.fromkeys(v for part in parts for v in part["settings"][key]))
    return {**first, "settings": settings, "merged_from": [path.name for path in paths],
            "runs": runs}


def write(result: dict, out: Path) -> None:
    """The JSON, the plot beside it when there are several budgets, and one summary line a run."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result) + "\n")
    if len(result["settings"]["budgets"]) > 1:
        plot(result, out.with_suffix(".png"))
    for r in result["runs"]:
        print(json.dumps({"policy": r["policy"], "budget": r["budget"], "budget_tokens": r["budget_tokens"],
                          "accuracy": r["accuracy"], "n": r["n"],
                          "per_depth": {k: v["accuracy"] for k, v in r["per_depth"].items()}}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p, ROOT / "fixtures")
    p.add_argument("--lora", type=Path, default=None, help="LoRA adapter GGUF (default: edge-vlm's, with its mmproj)")
    if TRAINED_MMPROJ.exists():  # the trained model is what this benchmark is for
        p.set_defaults(mmproj=TRAINED_MMPROJ)
    p.add_argument("--seed", type=int, default=0, help="stream i is make_stream(seed + i, frames)")
    p.add_argument("--streams", type=int, default=10)
    p.add_argument("--frames", type=int, default=100,
                   help="frames a stream (default 100: the full cache of SmolLM2 at 64 tokens a frame fits 119)")
    p.add_argument("--budget", default="1/8", help="video tokens kept: a count, or a share of the stream (1/8)")
    p.add_argument("--budgets", help="several budgets instead, comma-separated (1/16,1/8,1/4): runs each and "
                   "plots accuracy against budget")
    p.add_argument("--policies", default=DEFAULT_POLICIES,
                   help=f"comma-separated (default {DEFAULT_POLICIES}); InfiniPot-V settings after a colon, "
                   "joined by '+': infinipot-v:alpha=0.9+recent=0.25")
    p.add_argument("--positions", choices=["reindex", "keep"], default="reindex",
                   help="where kept tokens sit after a pass: reindex (compact, the streaming default) or keep "
                        "(their original positions; the stream must fit the model's trained context)")
    p.add_argument("--turns", choices=["multi", "single"], default="multi",
                   help="multi: each question sees the earlier ones and their answers, as in a chat (default); "
                        "single: each is asked alone of the same memory")
    p.add_argument("--questions-per-stream", type=int, default=8, metavar="K")
    p.add_argument("--question-room", type=int, default=SessionConfig.question_room)
    p.add_argument("--max-answer-tokens", type=int, default=16, help="answers are a few words (default 16)")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "recall.json")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RESULT",
                   help="instead of running: combine results of the same streams (policies run in separate "
                        "processes, one a core) into --out, and plot them")
    args = p.parse_args()
    if args.merge:
        write(merge(args.merge), args.out)
        return 0
    check_model_arguments(args)
    # The trained encoder comes with its adapter, however its path is written (without it the text model
    # has never seen these embeddings and answers nonsense).
    if args.lora is None and args.mmproj.resolve() == TRAINED_MMPROJ.resolve():
        args.lora = TRAINED_MMPROJ.parent / "lora.gguf"
    policies = [name.strip() for name in args.policies.split(",") if name.strip()]
    for spec in policies:
        try:
            policy_from_spec(spec)
        except SettingsError as e:
            sys.exit(f"benchmark_recall: {e}")
    budget_texts = list(dict.fromkeys(t.strip() for t in (args.budgets or args.budget).split(",") if t.strip()))

    try:
        sizes = probe(args)
    except (ModelError, SettingsError) as e:
        sys.exit(f"benchmark_recall: {e}")
    per_frame, prefix, n_ctx_train = sizes["tokens_per_frame"], sizes["prefix_tokens"], sizes["n_ctx_train"]
    stream_tokens = args.frames * per_frame
    # (policy, budget text, budget tokens or None, context): the full cache once, uncapped; the rest per budget.
    plan: list[tuple[str, str | None, int | None, int]] = []
    for policy in policies:
        if policy == "full":
            plan.append((policy, None, None, prefix + stream_tokens + args.question_room))
            continue
        for text in budget_texts:
            tokens = parse_budget(text, stream_tokens, per_frame)
            plan.append((policy, text, tokens, prefix + tokens + args.question_room))
    if args.positions == "keep" and prefix + stream_tokens + args.question_room > n_ctx_train:
        sys.exit(f"benchmark_recall: with --positions keep the last question sits at position "
                 f"{prefix + stream_tokens + args.question_room}, past the {n_ctx_train} the model was trained "
                 "for: use fewer --frames or --positions reindex")
    for policy, text, _, n_ctx in plan:
        if n_ctx > n_ctx_train:  # positions past the trained context are out of distribution: no fair figure
            what = "the full cache" if text is None else f"{policy} at budget {text}"
            sys.exit(f"benchmark_recall: {what} needs a context of {n_ctx} tokens ({args.frames} frames x "
                     f"{per_frame} tokens + {prefix} prompt + {args.question_room} question room) but the model "
                     f"was trained for {n_ctx_train}: use fewer --frames, a smaller budget, or drop it")

    streams = [make_stream(args.seed + i, args.frames) for i in range(args.streams)]
    runs = []
    with tqdm(total=len(plan) * args.streams * args.frames, unit="frame", mininterval=2.0) as bar:
        for policy, text, tokens, n_ctx in plan:
            bar.set_description(f"{policy}@{text}" if text else policy)
            t0 = time.perf_counter()
            try:
                records = run(args, policy, tokens, n_ctx, streams, bar)
            except (ModelError, SettingsError, MemoryFull) as e:
                sys.exit(f"benchmark_recall: {policy}: {e}")
            runs.append({"policy": policy, "budget": text, "budget_tokens": tokens, "positions": args.positions,
                         **summarise(records, args.frames), "wall_s": round(time.perf_counter() - t0, 1),
                         "records": records})

    result = {
        "settings": {"model": Path(str(args.model)).name, "mmproj": args.mmproj.name,
                     "lora": args.lora.name if args.lora else None, "mmproj_sha256": file_digest(args.mmproj),
                     "lora_sha256": file_digest(args.lora), "seed": args.seed,
                     "streams": args.streams, "frames": args.frames, "policies": policies, "budgets": budget_texts,
                     "questions_per_stream": args.questions_per_stream, "question_room": args.question_room,
                     "positions": args.positions, "turns": args.turns,
                     "max_answer_tokens": args.max_answer_tokens, "threads": args.threads,
                     "tokens_per_frame": per_frame, "prefix_tokens": prefix,
                     "depth_buckets": {name: [lo, hi] for name, lo, hi in DEPTH_BUCKETS}},
        "machine": machine_info(),
        "majority_answer_accuracy": majority_accuracy(runs[0]["records"]) if runs and runs[0]["records"] else None,
        "streams": [{"seed": s.seed, "events": [{"object": e.obj.name, "digit": e.obj.digit, "start": e.start,
                                                 "end": e.end} for e in s.events]} for s in streams],
        "runs": runs,
    }
    write(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
