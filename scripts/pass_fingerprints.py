"""Fingerprints of what the compression pass leaves: a restructure must leave them bit for bit as they were.

Streams the same frames through tiny random-weight models (every native-pass case of the test suite, the
baselines, the shared variant, in place and copying, and the families' layouts) and records, after every
pass, the SHA-256 of the sequence's whole KV state and of the slot bookkeeping, then a greedy answer. Run it
before and after a change to native/ or to the pass's protocol and compare:

    python -m scripts.pass_fingerprints --out results/pass_fingerprints.json
    python -m scripts.pass_fingerprints --check results/pass_fingerprints.json

The frames are made here (a textured background and a moving block, from the seed), so the fingerprints
depend on nothing but the models, the runtime and llama.cpp.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np
from tqdm import tqdm

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import policy_from_spec
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import Frame


def load(name: str) -> ModuleType:
    """A fixture writer of scripts/."""
    return importlib.import_module(f"scripts.{name}")


def frames(seed: int, n: int, size: tuple[int, int] = (96, 96)) -> list[Frame]:
    rng = np.random.default_rng(seed)
    h, w = size
    background = rng.integers(60, 200, (h, w, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        image = background.copy()
        y, x = (7 * i) % (h - 24), (11 * i) % (w - 24)
        image[y:y + 24, x:x + 24] = rng.integers(0, 255, 3, dtype=np.uint8)
        out.append(Frame(i, float(i), np.ascontiguousarray(image)))
    return out


def digest(*arrays: bytes | np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(a if isinstance(a, bytes) else np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def run_case(model_path: Path, mmproj: Path, spec: str, positions: str, flash_attn: str = "auto",
             cache_type: str = "f16", budget_frames: int = 8, n_frames: int = 21, direct: bool = True,
             size: tuple[int, int] = (96, 96)) -> dict:
    new_api = "n_ctx" in SessionConfig.__dataclass_fields__
    model_kw = {"n_threads": 2, "flash_attn": flash_attn, "cache_type": cache_type}
    if not new_api:
        model_kw["n_ctx"] = 2048
    with VisionLanguageModel(ModelConfig(model_path, mmproj, **model_kw)) as model:
        stream = frames(len(spec) + budget_frames, n_frames, size)
        probe = model.encode_frame(np.ascontiguousarray(stream[0].image[..., ::-1]))
        p = probe.n_tokens
        model.free_frame(probe)
        cfg = {"budget": budget_frames * p, "positions": positions, "question_room": 128, "direct_pass": direct}
        if new_api:
            cfg["n_ctx"] = 2048
        session = Session(model, SessionConfig(**cfg), policy_from_spec(spec, seed=1))
        state = (lambda: session.context.state_bytes()) if new_api else model.state_bytes
        passes = []
        for frame in stream:
            before = session.memory.passes
            session.insert_frame(frame)
            if session.memory.passes != before:
                passes.append({"state": digest(state()), "slots": digest(*session.memory.slots.arrays()),
                               "next_pos": session.memory.next_pos})
        answer = session.ask("What did you see?", max_tokens=6).text
        return {"passes": passes, "answer": answer, "final_state": digest(state())}


def cases(fix: dict[str, Path]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for model, mmproj, fa, positions, cache_type, spec in (
        ("llama-2x2", "mmproj-4x4", "on", "reindex", "f16", "infinipot-v"),
        ("llama-2x2", "mmproj-4x4", "off", "keep", "f16", "infinipot-v:pool"),
        ("llama-1x1", "mmproj-2x2", "off", "reindex", "f16", "infinipot-v:pool"),
        ("llama-3x4", "mmproj-6x6", "on", "keep", "f16", "infinipot-v"),
        ("llama-3x4", "mmproj-2x2", "off", "reindex", "f16", "tar"),
        ("llama-1x2", "mmproj-6x6", "on", "reindex", "f16", "van:pool"),
        ("llama-2x2", "mmproj-4x4", "on", "reindex", "f32", "infinipot-v:pool"),
        ("llama-3x4", "mmproj-2x2", "off", "keep", "f32", "infinipot-v"),
        ("llama-3x4", "mmproj-4x4", "on", "reindex", "f16", "infinipot-v:shared"),
        ("llama-3x4", "mmproj-4x4", "on", "keep", "f16", "infinipot-v:shared"),
        ("llama-2x2", "mmproj-4x4", "off", "reindex", "f16", "infinipot-v:alpha=0.75+recent=0.25"),
    ):
        out[f"{model}/{mmproj}/fa-{fa}/{positions}/{cache_type}/{spec}"] = {
            "args": (fix[model], fix[mmproj], spec, positions, fa, cache_type)}
    for spec in ("uniform", "sliding-window", "random"):
        for positions in ("reindex", "keep"):
            out[f"llama-3x4/mmproj-4x4/{positions}/{spec}"] = {"args": (fix["llama-3x4"], fix["mmproj-4x4"], spec,
                                                                        positions)}
    out["llama-2x2/mmproj-4x4/reindex/infinipot-v/copying"] = {
        "args": (fix["llama-2x2"], fix["mmproj-4x4"], "infinipot-v", "reindex"), "kw": {"direct": False}}
    for family in ("qwen25vl", "gemma3", "lfm2", "smolvlm2"):
        for positions in ("reindex", "keep"):
            kw = {"size": (240, 320)} if family == "qwen25vl" else {}
            out[f"{family}/{positions}/infinipot-v"] = {
                "args": (fix[f"{family}-model"], fix[f"{family}-mmproj"], "infinipot-v", positions),
                "kw": {"budget_frames": 4, "n_frames": 11, **kw}}
    return out


def make_all_fixtures(out: Path) -> dict[str, Path]:
    base = load("make_fixtures")
    fix = base.make_fixtures(out, seed=0)
    files = {"llama-2x2": fix["model"], "mmproj-4x4": fix["mmproj"]}
    for n_layer, n_head_kv in [(1, 1), (3, 4), (1, 2)]:
        files[f"llama-{n_layer}x{n_head_kv}"] = base.make_text_model(out / f"llama-{n_layer}x{n_head_kv}.gguf",
                                                                     n_layer=n_layer, n_head_kv=n_head_kv)
    for size in (32, 96):
        files[f"mmproj-{size // 16}x{size // 16}"] = base.make_mmproj(out / f"mmproj-{size // 16}.gguf", size)
    for family in ("qwen25vl", "gemma3", "lfm2", "smolvlm2"):
        pair = load(f"make_fixtures_{family}").make_fixtures(out / family, seed=0)
        files[f"{family}-model"], files[f"{family}-mmproj"] = pair["model"], pair["mmproj"]
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the fingerprints here")
    p.add_argument("--check", type=Path, help="compare with fingerprints written before; exit 1 on any difference")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        todo = cases(make_all_fixtures(Path(tmp)))
        result = {}
        for name, case in tqdm(todo.items(), desc="cases"):
            result[name] = run_case(*case["args"], **case.get("kw", {}))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.check:
        before = json.loads(args.check.read_text())
        differ = [name for name in before if before[name] != result.get(name)]
        for name in differ:
            print(f"DIFFERS: {name}\n  before {before[name]}\n  now    {result.get(name)}")
        print(f"{len(before) - len(differ)} of {len(before)} cases identical")
        sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
