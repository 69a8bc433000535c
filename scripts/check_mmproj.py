"""Check that llama.cpp's mtmd computes the same frame embeddings as PyTorch for an exported mmproj.

The PyTorch side is ``load_mmproj(--mmproj)`` from scripts/vlm_vision.py (the stored weights, widened to
float32); the llama.cpp side is ``VisionLanguageModel.frame_embeddings`` with the text model the file is
made for (SmolLM2-135M by default). Frames: uniform random pixels, the all-black and all-white frames
(the ends of the normalisation), and, when edge_runtime.scenes is installed and its frames have the
encoder's size, synthetic scene frames (BGR there, converted to RGB). Per frame it reports the largest
absolute difference, the relative error ||llama - torch|| / ||torch|| and the per-token cosine
similarity, writes them as JSON (--out), and exits 1 when any frame is outside the tolerance.

Tolerance. llama.cpp's CPU backend does not compute in float32 throughout: GELU is read from a table
indexed by the fp16-rounded input and stores an fp16 output; the patch conv's im2col is always fp16 (so
are the pixels and, in the product, the kernel); flash attention, on by default for the clip graph,
casts K and V to fp16 and accumulates V in fp16; with f16 matrices every activation is rounded to fp16
before a matrix product. Each rounding has a relative error of at most 2^-11 (about 4.9e-4), they mostly
average out, and random 4-layer encoders measure 4.7e-4 relative error in f16 and in f32 exports alike:
on f32 exports the GELU table and the im2col account for about 3e-4 of it, flash attention for about
3e-4 (vlm_vision's ggml_numerics mode reproduces the first two). Sharpening the same model like training
might (q and k weights x6, FFN x3, position table x50, uneven norm gains) raises it to 1.3e-3 at most.
REL_TOLERANCE = 5e-3 (ten fp16 roundings) leaves that margin again, and still fails the plausible wrong
graphs: quick GELU instead of GELU (1.2e-2 on the same model), stopping one layer early (0.2), a missing
post-norm (0.1). The cosine floor 0.9999 catches a single token gone wrong that the norm would dilute.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

REL_TOLERANCE = 5e-3
MIN_COSINE = 0.9999


def compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    """Differences of one frame's embeddings [n_tokens, width]: llama.cpp (got) against PyTorch (want)."""
    got = got.astype(np.float64)
    want = want.astype(np.float64)
    diff = got - want
    cosine = (got * want).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1) + 1e-30)
    return {
        "max_abs": float(np.abs(diff).max()),
        "max_abs_reference": float(np.abs(want).max()),
        "rel_error": float(np.linalg.norm(diff) / (np.linalg.norm(want) + 1e-30)),
        "min_cosine": float(cosine.min()),
        "mean_cosine": float(cosine.mean()),
    }


def within_tolerance(stats: dict[str, float]) -> bool:
    return stats["rel_error"] <= REL_TOLERANCE and stats["min_cosine"] >= MIN_COSINE


def make_frames(n: int, seed: int, size: int) -> tuple[list[str], np.ndarray, str | None]:
    """(labels, RGB uint8 frames [m, size, size, 3], a note when scene frames were skipped)."""
    rng = np.random.default_rng(seed)
    frames = [np.zeros((size, size, 3), np.uint8), np.full((size, size, 3), 255, np.uint8)]
    frames += list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    labels = ["black", "white"] + [f"random {i}" for i in range(n)]
    note = None
    if importlib.util.find_spec("edge_runtime.scenes") is None:
        note = "edge_runtime.scenes not installed: no scene frames"
    else:
        from edge_runtime.scenes import make_stream

        bgr = make_stream(seed, n).frames(0, n)
        if bgr.shape[1:3] != (size, size):
            # mtmd would resize them; the PyTorch model only takes frames of its own size.
            note = f"scene frames are {bgr.shape[2]}x{bgr.shape[1]}, the encoder takes {size}x{size}: skipped"
        else:
            frames += list(np.ascontiguousarray(bgr[..., ::-1]))
            labels += [f"scene {i}" for i in range(len(bgr))]
    return labels, np.stack(frames), note


def check(mmproj: Path, model: str, n_frames: int, seed: int, threads: int) -> dict[str, object]:
    import torch

    from edge_runtime.model import ModelConfig, VisionLanguageModel, resolve_model
    from scripts.vlm_vision import load_mmproj

    reference = load_mmproj(mmproj)
    labels, frames, note = make_frames(n_frames, seed, reference.config.image_size)
    with torch.no_grad():
        want = reference(torch.from_numpy(frames)).numpy()
    config = ModelConfig(resolve_model(model), mmproj, n_threads=threads, use_gpu=False)
    with VisionLanguageModel(config) as vlm:
        got = np.stack([vlm.frame_embeddings(frame) for frame in frames])
    results = [{"frame": label, **compare(g, w)} for label, g, w in zip(labels, got, want, strict=True)]
    return {
        "mmproj": str(mmproj),
        "text_model": str(config.model_path),
        "seed": seed,
        "tokens_per_frame": int(got.shape[1]),
        "width": int(got.shape[2]),
        "tolerance": {"rel_error": REL_TOLERANCE, "min_cosine": MIN_COSINE},
        "note": note,
        "frames": results,
        "ok": all(within_tolerance(r) for r in results),  # type: ignore[arg-type]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--mmproj", type=Path, required=True, help="an mmproj written by vlm_vision.export_mmproj")
    parser.add_argument("--model", default="smollm2", help="text model GGUF or built-in name (default smollm2)")
    parser.add_argument("--frames", type=int, default=8, help="random (and scene) frames, besides black and white")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    args = parser.parse_args()
    report = check(args.mmproj, args.model, args.frames, args.seed, args.threads)
    print(f"{report['mmproj']}: {report['tokens_per_frame']} tokens x {report['width']} per frame")
    print(f"{'frame':<12} {'max abs':>9} {'(of max)':>9} {'rel err':>9} {'min cos':>10}")
    for r in report["frames"]:  # type: ignore[attr-defined]
        flag = "" if within_tolerance(r) else "  OUT OF TOLERANCE"
        print(f"{r['frame']:<12} {r['max_abs']:9.2e} {r['max_abs_reference']:9.2e} {r['rel_error']:9.2e} "
              f"{r['min_cosine']:10.7f}{flag}")
    if report["note"]:
        print(f"note: {report['note']}")
    verdict = "agree" if report["ok"] else "DISAGREE"
    print(f"{verdict} (tolerance: relative error <= {REL_TOLERANCE:g}, cosine >= {MIN_COSINE})")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
