"""What a memory policy keeps of the objects in a stream, and how well InfiniPot-V's scores find them.

The recall benchmark says whether answers stay right; this says why. A scene stream is a fixed camera in
which objects appear for a few frames; the tokens that show an object (its patches in the frames it is
visible) are the evidence every question needs, the rest is background. After streaming it through the
runtime under a policy, for every appearance: its coverage (kept object tokens over one frame's worth of
them, capped at 1), averaged over the (layer, KV head) pairs (each keeps its own set), and the share of
kept tokens that are object tokens at all. Under InfiniPot-V, per layer, the AUC of TaR and VaN for object
over background tokens at every pass. No question is asked: this measures the selection, not the model.

    python -m scripts.retention --streams 8 --budget 1/8 --policies infinipot-v,tar,van,uniform --out r.json
    python -m scripts.retention --policies infinipot-v,infinipot-v:alpha=0.9,infinipot-v:pool
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import InfiniPotV, policy_from_spec
from edge_runtime.policies.base import recent_frames
from edge_runtime.scenes import Stream, make_stream
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource
from scripts.bench import machine_info, save_figure
from scripts.benchmark_recall import TRAINED_MMPROJ, parse_budget
from scripts.scene_tools import object_patches


def evidence_mask(stream: Stream, frame: np.ndarray, patch: np.ndarray, nx: int, ny: int) -> np.ndarray:
    """Per slot: the index of the event whose object it shows, or -1 for background."""
    out = np.full(frame.shape, -1, np.int32)
    for k, event in enumerate(stream.events):
        for t in range(event.start, event.end):
            hit = (frame == t) & np.isin(patch, object_patches(stream, t, nx, ny))
            out[hit] = k
    return out


def retention(stream: Stream, session: Session) -> dict:
    """Per appearance: how much of its object each (layer, head) still holds at the end of the stream.

    An object that stays put for eight frames is redundant after the first: keeping one frame's worth of it
    is enough, so coverage = kept object tokens / the object's tokens in one of its frames, capped at 1.
    """
    mem = session.memory
    frame, patch, _ = mem.slots.arrays()  # [L, H, n]
    nx, ny = mem.grid
    shows = evidence_mask(stream, frame, patch, nx, ny)
    events = []
    for k, event in enumerate(stream.events):
        total = sum(len(object_patches(stream, t, nx, ny)) for t in range(event.start, event.end))
        coverage = np.minimum(1.0, (shows == k).sum(axis=2) / (total / (event.end - event.start)))  # [L, H]
        events.append({"object": event.obj.name, "start": event.start, "end": event.end,
                       "depth": stream.n_frames - event.end, "tokens": total,
                       "coverage": round(float(coverage.mean()), 4),
                       "heads_lost": round(float((coverage < 0.5).mean()), 4),
                       "coverage_by_layer": [round(float(x), 3) for x in coverage.mean(axis=1)]})
    # Kept by a pass (the frames since the last one are whole in every head); all of it for the full cache.
    past = frame < stream.n_frames - mem.frames_since_pass if mem.passes else np.ones(frame.shape, bool)
    return {"events": events,
            "object_share_of_past_slots": round(float(((shows >= 0) & past).sum() / max(1, past.sum())), 4)}


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney)."""
    both = np.concatenate([positive, negative])
    _, inverse, counts = np.unique(both, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # 1-based, tied values share their mean rank
    n_pos, n_neg = len(positive), len(negative)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class ScoreProbe:
    """Watches an InfiniPot-V pass: at every pass, per layer, how well TaR and VaN rank the object tokens of
    the past frames above their background (AUC: 1 = every object token first, 0.5 = no better than chance).
    The scores are the native pass's own (KVPass.record_scores), pooling included."""

    def __init__(self, policy: InfiniPotV, stream: Stream) -> None:
        self.policy, self.stream = policy, stream
        self.auc: dict[str, list[list[float]]] = {"tar": [], "van": []}  # per pass, per layer (mean over heads)

    def attach(self, session: Session) -> None:
        session.compressor.on_read.append(self.before_choice)
        session.compressor.on_pass.append(self.after_pass)

    def before_choice(self, kv, memory, keep) -> None:  # noqa: ANN001 - Compressor.on_read's signature
        kv.record_scores(True)
        n = memory.video_tokens
        self._frame, self._patch = (t[:, :, :n].copy() for t in memory.slots.pass_tables()[:2])
        self._grid, self._oldest = memory.grid, recent_frames(memory, self.policy.recent_fraction)

    def after_pass(self, kv, memory, result) -> None:  # noqa: ANN001 - Compressor.on_pass's signature
        frame, patch, (nx, ny) = self._frame, self._patch, self._grid
        shows = evidence_mask(self.stream, frame, patch, nx, ny) >= 0
        past = frame < self._oldest
        for name, scores in zip(("tar", "van"), kv.scores(), strict=True):
            if np.isnan(scores).all():  # the half this policy leaves out
                continue
            per_layer = []
            for layer in range(frame.shape[0]):
                heads = [auc(s[o & p], s[~o & p])
                         for s, o, p in zip(scores[layer], shows[layer], past[layer], strict=True)
                         if (o & p).any() and (~o & p).any()]
                per_layer.append(float(np.mean(heads)) if heads else float("nan"))
            if not np.isnan(per_layer).all():
                self.auc[name].append(per_layer)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=100, help="stream i is make_stream(seed + i, frames)")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--frames", type=int, default=120)
    p.add_argument("--budget", default="1/8")
    p.add_argument("--policies", default="infinipot-v,tar,van,uniform",
                   help="comma-separated; InfiniPot-V settings after a colon: infinipot-v:alpha=0.9+pool")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    # The trained edge-vlm: retention depends on the keys and values a real model writes.
    model = VisionLanguageModel(ModelConfig("smollm2", TRAINED_MMPROJ, n_threads=args.threads,
                                            lora_path=TRAINED_MMPROJ.parent / "lora.gguf"))
    streams = [make_stream(args.seed + i, args.frames) for i in range(args.streams)]
    tpf = model.encode_frame(np.ascontiguousarray(streams[0].frame(0)[..., ::-1]))
    tokens_per_frame = tpf.n_tokens
    model.free_frame(tpf)
    budget = parse_budget(args.budget, args.frames * tokens_per_frame, tokens_per_frame)
    runs = []
    specs = [spec.strip() for spec in args.policies.split(",") if spec.strip()]
    bar = tqdm(total=len(specs) * len(streams) * args.frames, unit="frame", mininterval=2.0)
    for spec in specs:
        per_stream, passes = [], {"tar": [], "van": []}
        for stream in streams:
            policy = policy_from_spec(spec)
            probe = ScoreProbe(policy, stream) if isinstance(policy, InfiniPotV) else None
            # The full cache runs uncapped (the 8192-token context holds 120 frames of 36 tokens): the reference.
            session = Session(model, SessionConfig(n_ctx=8192, budget=None if spec == "full" else budget), policy)
            if probe:
                probe.attach(session)
            for frame in SyntheticSource(stream.seed, stream.n_frames):
                session.insert_frame(frame)
                bar.update()
            per_stream.append(retention(stream, session))
            session.close()
            for name in passes:
                passes[name] += probe.auc[name] if probe else []
        events = [e for s in per_stream for e in s["events"]]
        run = {"policy": spec,
               "coverage": round(float(np.mean([e["coverage"] for e in events])), 4),
               "heads_lost": round(float(np.mean([e["heads_lost"] for e in events])), 4),
               "object_share_of_past_slots": round(float(np.mean([s["object_share_of_past_slots"]
                                                                  for s in per_stream])), 4)}
        for name, rows in passes.items():
            if rows:
                run[f"{name}_auc"] = round(float(np.nanmean(rows)), 4)
        tqdm.write(json.dumps(run))
        for name, rows in passes.items():
            if rows:
                run[f"{name}_auc_by_layer"] = [round(float(x), 3) for x in np.nanmean(rows, axis=0)]
        runs.append({**run, "streams": per_stream})
    bar.close()
    model.close()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"budget": budget, "frames": args.frames, "seed": args.seed,
                                        "streams": args.streams, "machine": machine_info(), "runs": runs}) + "\n")
        plot(runs, budget, args, args.out.with_suffix(".png"))


def plot(runs: list[dict], budget: int, args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in runs:
        if "coverage_by_layer" not in run["streams"][0]["events"][0]:
            continue
        by_layer = np.mean([e["coverage_by_layer"] for s in run["streams"] for e in s["events"]], axis=0)
        left.plot(by_layer, marker=".", label=f"{run['policy']} (mean {run['coverage']:.2f})")
    left.set_xlabel("layer")
    left.set_ylabel("object coverage at the end (1 = a frame's worth)")
    left.set_ylim(0, 1.02)
    left.set_title(f"what stays: {args.streams} streams of {args.frames} frames, |M| = {budget}", fontsize=9)
    seen = set()
    for run in runs:
        for name, style in (("tar", "-"), ("van", "--")):
            key = f"{name}_auc_by_layer"
            if key in run and (name, run["policy"].split(":")[0]) not in seen:
                seen.add((name, run["policy"].split(":")[0]))
                right.plot(run[key], style, marker=".", label=f"{name.upper()} ({run['policy']})")
    right.axhline(0.5, color="grey", linestyle=":", label="chance")
    right.set_xlabel("layer")
    right.set_ylabel("AUC: object tokens over background")
    right.set_ylim(0, 1)
    right.set_title("how well each score finds the objects, per layer (mean over heads and passes)", fontsize=9)
    save_figure(fig, [left, right], path)


if __name__ == "__main__":
    main()
