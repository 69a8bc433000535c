"""`edge-runtime --demo`: the trained edge-vlm watches a synthetic scene and is quizzed along the way.

The scene (edge_runtime.scenes) is a fixed camera where objects come and go; its questions have known
answers, so every answer is printed with the truth beside it. The memory is capped at an eighth of the
video tokens the stream produces and InfiniPot-V decides what stays, so the later questions are answered
from a compressed memory: what the runtime is for, in a minute on a laptop CPU.
"""

from __future__ import annotations

import argparse
import time

from edge_runtime import scenes
from edge_runtime.model import VisionLanguageModel
from edge_runtime.output import Output
from edge_runtime.policies import make_policy
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

DEMO_FRAMES = 120
DEMO_SEED = 7  # a held-out seed (training streams start at 10^6) whose questions cover most kinds
QUESTIONS_PER_STOP = 3
STOPS = 3  # quizzed after a third, two thirds and all of the stream
BUDGET_FRACTION = 1 / 8  # of the stream's video tokens: the setting of the recall benchmark


def run_demo(args: argparse.Namespace, model: VisionLanguageModel, out: Output) -> int:
    """Stream the demo scene through `model` (built and closed by the CLI) and quiz it; report through `out`."""
    n_frames = args.max_frames or DEMO_FRAMES
    seed = args.synthetic if args.synthetic is not None else DEMO_SEED
    source = SyntheticSource(seed, n_frames, fps=args.fps, realtime=args.realtime)
    stream = source.stream
    probe = model.encode_frame(stream.frame(0)[..., ::-1].copy())
    tokens_per_frame = probe.n_tokens
    model.free_frame(probe)
    budget_frames = max(4, round(n_frames * BUDGET_FRACTION))
    budget = args.budget or budget_frames * tokens_per_frame
    session = Session(model, SessionConfig(n_ctx=args.ctx, budget=budget, max_answer_tokens=16),
                      make_policy(args.policy or "infinipot-v"))
    out.say(f"edge-vlm (SmolLM2-135M + a trained {tokens_per_frame}-token encoder) watches {n_frames} frames of a "
            f"synthetic scene (seed {seed}); memory capped at {budget} video tokens, "
            f"{budget / (n_frames * tokens_per_frame):.0%} of the stream, by {session.policy.name}.")
    stops = {round(n_frames * (i + 1) / STOPS) for i in range(STOPS)}
    right = total = 0
    t0 = time.perf_counter()
    for frame in source:
        session.insert_frame(frame)
        if session.frames_seen not in stops:
            continue
        status = session.status()
        out.say(f"\nafter {session.frames_seen} frames ({status.video_tokens} video tokens in memory, "
                f"{status.passes} compression passes):")
        session.history.clear()  # each stop is its own conversation
        for q in stream.ask_set(seed + session.frames_seen, QUESTIONS_PER_STOP, until=session.frames_seen):
            answer = session.ask(q.text)
            ok = scenes.grade(answer.text, q.answer)
            right += ok
            total += 1
            out.graded(session.frames_seen, q, answer.text, ok)
    status = session.status()
    out.say(f"\n{right}/{total} right in {time.perf_counter() - t0:.0f} s; memory at the end: "
            f"{status.video_tokens} video tokens (the stream made {n_frames * tokens_per_frame}), "
            f"KV {status.kv_bytes / 2**20:.1f} MB, peak RSS {status.peak_rss_mb:.0f} MB")
    return 0
