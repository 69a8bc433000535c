"""Does the exported edge-vlm answer in llama.cpp as the PyTorch model it came from does?

For held-out scenes, each question is answered twice from the same frames and the same prompt: by the
runtime (llama.cpp: mmproj.gguf + lora.gguf on the Q4_1 text model) and by PyTorch (the encoder read back
from mmproj.gguf, the LoRA from lora.gguf, the text model dequantized from the same GGUF bytes), both
greedy. The prompt, history included, is the one the runtime renders, so the two differ only in numerics.

    python -m scripts.check_vlm --streams 5 --frames 12 --out results/vlm_agreement.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from edge_runtime import scenes
from edge_runtime.model import ModelConfig, VisionLanguageModel, edge_vlm_files
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

ROOT = Path(__file__).resolve().parents[1]


def torch_model(text_gguf: Path, mmproj: Path, lora: Path):
    import gguf
    import torch

    from scripts.vlm_text import LoraConfig, build_text_model, load_weights, pack
    from scripts.vlm_vision import load_mmproj

    with tempfile.TemporaryDirectory() as cache:
        pack(text_gguf, Path(cache))
        hparams, weights = load_weights(Path(cache), "cpu")
    reader = gguf.GGUFReader(lora)
    tensors = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in reader.tensors}
    rank = next(v.shape[0] for k, v in tensors.items() if k.endswith(".lora_a"))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    text = build_text_model(hparams, weights, LoraConfig(rank=rank, alpha=alpha), torch.float32)
    for module in text.modules():
        if getattr(module, "lora_a", None) is not None:
            module.lora_a.data.copy_(tensors[module.name + ".lora_a"])
            module.lora_b.data.copy_(tensors[module.name + ".lora_b"])
    return text.eval(), load_mmproj(mmproj).eval()


def torch_answer(text, vision, prefix: list[int], frames: np.ndarray, prompt: list[int], end: int,
                 max_tokens: int) -> list[int]:
    """Greedy answer tokens (without the end token) for [prefix, frames, prompt]."""
    import torch

    with torch.no_grad():
        emb = vision(torch.from_numpy(np.ascontiguousarray(frames[..., ::-1])))  # BGR -> RGB, [F, tpf, n_embd]
        x = torch.cat([text.embed(torch.tensor(prefix)), emb.reshape(-1, emb.shape[-1]),
                       text.embed(torch.tensor(prompt))])[None]
        out: list[int] = []
        for _ in range(max_tokens):
            token = int(text.logits(text(x)[:, -1]).argmax())
            if token == end:
                break
            out.append(token)
            x = torch.cat([x, text.embed(torch.tensor([token]))[None]], dim=1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=200, help="scene seeds seed .. seed + streams - 1 (held out)")
    p.add_argument("--streams", type=int, default=5)
    p.add_argument("--frames", type=int, default=12)
    p.add_argument("--questions", type=int, default=4, help="per stream, asked one after another")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "vlm_agreement.json")
    args = p.parse_args()

    text_gguf, mmproj, lora = edge_vlm_files()
    text, vision = torch_model(text_gguf, mmproj, lora)
    model = VisionLanguageModel(ModelConfig(text_gguf, mmproj, lora_path=lora, n_threads=args.threads))
    end = model.tokenize("<|im_end|>", add_special=False)[0]
    records = []
    try:
        for i in range(args.streams):
            stream = scenes.make_stream(args.seed + i, args.frames)
            session = Session(model, SessionConfig(n_ctx=2048, max_answer_tokens=16))
            for frame in SyntheticSource(stream.seed, stream.n_frames):
                session.insert_frame(frame)
            prefix = model.tokenize(session.opening_text, add_special=True)
            for q in stream.ask_set(args.seed + i, args.questions):
                prompt = model.tokenize(session.question_prompt(q.text))  # before ask() adds this turn
                runtime = session.ask(q.text).text.strip()
                tokens = torch_answer(text, vision, prefix, stream.frames(0, args.frames), prompt, end, 16)
                pytorch = b"".join(model.token_bytes(t) for t in tokens).decode("utf-8", "replace").strip()
                records.append({"stream": i, "question": q.text, "truth": q.answer, "llama_cpp": runtime,
                                "pytorch": pytorch, "same": runtime == pytorch})
                print(json.dumps(records[-1]), flush=True)
    finally:
        model.close()
    same = sum(r["same"] for r in records)
    summary = {"answers": len(records), "same": same, "agreement": round(same / len(records), 4),
               "llama_cpp_right": sum(scenes.grade(r["llama_cpp"], r["truth"]) for r in records),
               "pytorch_right": sum(scenes.grade(r["pytorch"], r["truth"]) for r in records)}
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out.name)}, "summary": summary,
                                    "records": records}, indent=1) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
