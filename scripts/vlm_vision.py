"""A small ViT + LLaVA ``mlp`` projector in PyTorch whose forward is llama.cpp's clip graph, and its mmproj GGUF.

We train the vision side of a tiny VLM from scratch in PyTorch and run it with llama.cpp's mtmd, so the
two must compute the same function. ``VisionEncoder.forward`` is, op for op, what clip.cpp builds for
projector type ``mlp`` (tools/mtmd/models/llava.cpp, clip_graph_llava::build) once the GGUF written by
``export_mmproj`` sets two keys that change the graph:

* ``clip.use_gelu = true``: without it the transformer FFN uses ggml_gelu_quick (x * sigmoid(1.702 x)).
  With it, FFN and projector both use ggml_gelu, the tanh approximation of GELU (ggml-cpu evaluates it
  through a 64k-entry fp16 table: input and output rounded to fp16), i.e. ``F.gelu(x, approximate="tanh")``.
* ``clip.vision.feature_layer = [n_layer]``: without it LLaVA graphs stop one block early (the
  penultimate layer's features). With it every trained block runs and post_ln (if any) follows the last.

The rest of the graph, as mtmd runs it on one frame:

1. Preprocessing (mtmd-image.cpp, fixed-size preprocessor for ``mlp`` without grid pinpoints): a frame
   that is already image_size x image_size is copied, not resized or padded; other sizes are resized
   (bicubic, aspect-preserving, padded), which this module does not reproduce, so it refuses them.
   Pixels become float32 ``u8 / 255.0f`` then ``(x - mean[c]) / std[c]`` (clip-impl.h, clip_image_f32).
2. Patch embedding: conv2d with kernel = stride = patch_size, no padding, plus bias; patches in row-major
   order (index y * nx + x). No class token; learned position embeddings added for positions 0..n-1.
3. pre_ln, then N pre-norm blocks: x += attn_out(MHA(ln1(x))), x += ffn_down(gelu(ffn_up(ln2(x)))),
   attention softmax(q k^T / sqrt(d_head)) v without mask, all linear layers with biases. LayerNorms are
   ggml_norm (population variance, eps inside the sqrt) times weight plus bias: torch's LayerNorm.
4. Optional post_ln, then mm.0 -> gelu -> mm.2.

What differs is arithmetic, not the graph; ggml-cpu computes in fp16 in places. It reads GELU from a table
of fp16(gelu(fp16(x))); it always builds the patch conv's im2col in fp16, which also rounds the kernel to
fp16 in the product (ggml.c, ggml_conv_2d); flash attention (on by default for clip on CPU) casts K and V
to fp16 and accumulates in fp16; with f16 matrices it rounds activations to fp16 before each product.
Random 4-layer encoders differ from PyTorch by ~5e-4 relative error. ``VisionEncoder(config,
ggml_numerics=True)`` reproduces the first two (forward only; gradients stay the smooth model's), which
brings that to ~3e-4 with flash attention on and ~1e-4 with it off on f32 exports; on f16 exports the
activation rounding hides the gain.
scripts/check_mmproj.py and tests/test_vlm_vision.py measure the difference against the real llama.cpp.

Needs torch, numpy and gguf only (no llama_cpp, no OpenCV), so it imports on the training machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PROJECTOR_TYPE = "mlp"  # LLaVA-1.5's projector: mm.0 -> GELU -> mm.2


@dataclass(frozen=True)
class VisionConfig:
    """Shape of the vision tower and projector; everything llama.cpp needs to rebuild the graph."""

    image_size: int = 96  # frames are 96x96: (96 / 16)^2 = 36 tokens a frame
    patch_size: int = 16
    width: int = 256
    layers: int = 4
    heads: int = 4
    ffn: int = 1024  # must differ from width: clip.cpp swaps ffn_up/ffn_down of mlp models when they are equal
    projector_hidden: int = 576
    out_width: int = 576  # the text model's n_embd (SmolLM2-135M); mtmd refuses any other
    # Trained from scratch, so no pretrained statistics to honour: 0.5 / 0.5 maps pixels to [-1, 1].
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    eps: float = 1e-5  # torch.nn.LayerNorm's default; stored in the GGUF, so any value works
    post_ln: bool = True  # normalise the tower's output before the projector (CLIP towers have one)

    def __post_init__(self) -> None:
        # The GGUF stores these as float32: round them now so that load_mmproj(export) gives an equal config.
        for name in ("image_mean", "image_std"):
            object.__setattr__(self, name, tuple(float(np.float32(v)) for v in getattr(self, name)))
        object.__setattr__(self, "eps", float(np.float32(self.eps)))
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")
        if self.ffn == self.width:
            # clip.cpp's legacy fix-up: for mlp projectors, if ffn_down's input width equals the model
            # width it assumes the file has up and down swapped, and swaps them back.
            raise ValueError("ffn must differ from width: llama.cpp would swap ffn_up and ffn_down")
        if self.layers < 1:
            raise ValueError("layers must be at least 1")

    @property
    def grid(self) -> int:
        """Patches along each side."""
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        """Tokens a frame becomes in the text model."""
        return self.grid**2


class Block(nn.Module):
    """One pre-norm transformer block as clip_graph_llava::build runs it."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.ln1 = nn.LayerNorm(config.width, eps=config.eps)
        self.attn_q = nn.Linear(config.width, config.width)
        self.attn_k = nn.Linear(config.width, config.width)
        self.attn_v = nn.Linear(config.width, config.width)
        self.attn_out = nn.Linear(config.width, config.width)
        self.ln2 = nn.LayerNorm(config.width, eps=config.eps)
        self.ffn_up = nn.Linear(config.width, config.ffn)
        self.ffn_down = nn.Linear(config.ffn, config.width)

    def forward(self, x: torch.Tensor, ggml_numerics: bool = False) -> torch.Tensor:
        b, n, width = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, n, width] -> [B, heads, n, d_head]
            return t.view(b, n, self.heads, width // self.heads).transpose(1, 2)

        # SDPA's default scale is 1/sqrt(d_head), clip.cpp's kq_scale; no mask: every patch sees every patch.
        a = F.scaled_dot_product_attention(split(self.attn_q(h)), split(self.attn_k(h)), split(self.attn_v(h)))
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, n, width))
        return x + self.ffn_down(gelu(self.ffn_up(self.ln2(x)), ggml_numerics))


def gelu(x: torch.Tensor, ggml_numerics: bool = False) -> torch.Tensor:
    """ggml_gelu: the tanh approximation of GELU, not erf.

    With ``ggml_numerics`` the forward value is exactly ggml-cpu's (vec.h, GGML_GELU_FP16): 0 at or below
    -10, x at or above 10, else the table entry fp16(gelu(fp16(x))). The gradient stays the smooth one
    (straight-through), since the table is piecewise constant.
    """
    y = F.gelu(x, approximate="tanh")
    if not ggml_numerics:
        return y
    table = F.gelu(x.detach().half().float(), approximate="tanh").half().to(x.dtype)
    table = torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))
    return y + (table - y).detach()


def fp16_rounded(t: torch.Tensor) -> torch.Tensor:
    """t rounded to fp16 in the forward pass, unchanged in the backward pass."""
    return t + (t.half().to(t.dtype) - t).detach()


class VisionEncoder(nn.Module):
    """RGB frames [B, H, W, 3] (channels last, uint8 or float in 0..255) -> [B, n_patches, out_width].

    Channels last because that is how frames arrive (numpy, mtmd bitmaps); H = W = image_size exactly,
    since mtmd would resize anything else. Patches come out in row-major order, y * nx + x, as mtmd
    hands them to the text model.
    """

    def __init__(self, config: VisionConfig, ggml_numerics: bool = False) -> None:
        super().__init__()
        self.config = config
        self.ggml_numerics = ggml_numerics  # reproduce ggml-cpu's fp16 GELU table and fp16 patch conv
        self.register_buffer("mean", torch.tensor(config.image_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std, dtype=torch.float32), persistent=False)
        self.patch_embd = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size, bias=True)
        self.position_embd = nn.Parameter(torch.randn(config.n_patches, config.width) * 0.02)
        self.pre_ln = nn.LayerNorm(config.width, eps=config.eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.post_ln = nn.LayerNorm(config.width, eps=config.eps) if config.post_ln else None
        self.mm_0 = nn.Linear(config.width, config.projector_hidden)
        self.mm_2 = nn.Linear(config.projector_hidden, config.out_width)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] pixels -> [B, 3, H, W] float32, with mtmd's float32 ops in mtmd's order."""
        size = self.config.image_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1:3] != (size, size):
            raise ValueError(f"expected RGB images [B, {size}, {size}, 3], got {list(images.shape)}")
        x = images.to(torch.float32) / 255.0
        x = (x - self.mean) / self.std
        return x.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels, kernel = self.normalize(images), self.patch_embd.weight
        if self.ggml_numerics:  # im2col in fp16, so the product sees fp16 pixels and an fp16 kernel
            pixels, kernel = fp16_rounded(pixels), fp16_rounded(kernel)
        x = F.conv2d(pixels, kernel, self.patch_embd.bias, stride=self.config.patch_size)  # [B, width, ny, nx]
        x = x.flatten(2).transpose(1, 2)  # [B, ny * nx, width], row-major like ggml's conv output
        x = self.pre_ln(x + self.position_embd)
        for block in self.blocks:
            x = block(x, self.ggml_numerics)
        if self.post_ln is not None:
            x = self.post_ln(x)
        return self.mm_2(gelu(self.mm_0(x), self.ggml_numerics))


# ---------------------------------------------------------------------------------------------------
# GGUF: names, keys and types that clip.cpp reads (see also scripts/make_fixtures.py).


def gguf_tensor_names(config: VisionConfig) -> dict[str, str]:
    """PyTorch state_dict name -> mmproj tensor name."""
    names = {
        "patch_embd.weight": "v.patch_embd.weight",
        "patch_embd.bias": "v.patch_embd.bias",
        "position_embd": "v.position_embd.weight",
        "pre_ln.weight": "v.pre_ln.weight",
        "pre_ln.bias": "v.pre_ln.bias",
    }
    for il in range(config.layers):
        for part in ("ln1", "attn_q", "attn_k", "attn_v", "attn_out", "ln2", "ffn_up", "ffn_down"):
            for kind in ("weight", "bias"):
                names[f"blocks.{il}.{part}.{kind}"] = f"v.blk.{il}.{part}.{kind}"
    if config.post_ln:
        names["post_ln.weight"] = "v.post_ln.weight"
        names["post_ln.bias"] = "v.post_ln.bias"
    for part in ("mm_0", "mm_2"):
        for kind in ("weight", "bias"):
            names[f"{part}.{kind}"] = f"{part.replace('_', '.')}.{kind}"
    return names


def export_mmproj(model: VisionEncoder, config: VisionConfig, path: str | Path, dtype: str = "f16") -> Path:
    """Write ``model`` as an mmproj GGUF that mtmd loads next to the text model; returns the path.

    Matrices (conv kernel, position table, linear weights) are stored as ``dtype`` (f16: a few MB, what
    real mmproj files use; f32: for exactness checks); norms and biases stay f32, which clip.cpp expects
    for the tensors it adds and multiplies elementwise. Written to a temporary name, then renamed.
    """
    if dtype not in ("f16", "f32"):
        raise ValueError(f"dtype must be f16 or f32, not {dtype}")
    if config != model.config:
        raise ValueError(f"config {config} is not the model's {model.config}")
    path = Path(path)
    writer = gguf.GGUFWriter(None, "clip")
    writer.add_name(
        f"edge-runtime ViT {config.layers}x{config.width} ({config.heads} heads, ffn {config.ffn}), "
        f"{config.image_size}px/{config.patch_size} = {config.n_patches} tokens, mlp projector to {config.out_width}"
    )
    writer.add_description("edge-runtime vision encoder trained from scratch; scripts/vlm_vision.py")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    # clip.cpp reads these with typed getters that assert the stored type: u32, f32, bool, i32/f32 arrays.
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_string("clip.projector_type", PROJECTOR_TYPE)
    writer.add_bool("clip.use_gelu", True)  # GELU (tanh) in the FFN instead of the default quick GELU
    writer.add_uint32("clip.vision.image_size", config.image_size)
    writer.add_uint32("clip.vision.patch_size", config.patch_size)
    writer.add_uint32("clip.vision.embedding_length", config.width)
    writer.add_uint32("clip.vision.feed_forward_length", config.ffn)
    writer.add_uint32("clip.vision.block_count", config.layers)
    writer.add_uint32("clip.vision.projection_dim", config.out_width)  # required, unused by mlp
    writer.add_uint32("clip.vision.attention.head_count", config.heads)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", config.eps)
    writer.add_array("clip.vision.image_mean", [float(v) for v in config.image_mean])
    writer.add_array("clip.vision.image_std", [float(v) for v in config.image_std])
    # Run all layers: the default for llava graphs is n_layer - 1 (the penultimate layer's output).
    writer.add_key_value("clip.vision.feature_layer", [config.layers], gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.INT32)

    state = model.state_dict()
    matrix_type = np.float16 if dtype == "f16" else np.float32
    for torch_name, gguf_name in gguf_tensor_names(config).items():
        array = state[torch_name].detach().to("cpu", torch.float32).numpy()
        # numpy order (out, in[, kh, kw]); the writer reverses it into ggml's ne = [in, out] / [kw, kh, in, out].
        writer.add_tensor(gguf_name, array.astype(matrix_type if array.ndim >= 2 else np.float32))

    tmp = path.with_name(path.name + ".tmp")
    writer.write_header_to_file(tmp)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def _field(reader: gguf.GGUFReader, key: str) -> object:
    field = reader.get_field(key)
    if field is None:
        raise ValueError(f"{key} missing: not an mmproj written by export_mmproj")
    return field.contents()


def _int(reader: gguf.GGUFReader, key: str) -> int:
    return int(_field(reader, key))  # type: ignore[call-overload]


def _floats(reader: gguf.GGUFReader, key: str) -> tuple[float, ...]:
    return tuple(float(v) for v in _field(reader, key))  # type: ignore[attr-defined]


def load_mmproj(path: str | Path) -> VisionEncoder:
    """Read an mmproj written by ``export_mmproj`` back into a float32 VisionEncoder (eval mode).

    The weights are exactly the stored ones (f16 values widened to f32), so this model is the reference
    llama.cpp should reproduce. Files whose graph this module does not implement are refused.
    """
    reader = gguf.GGUFReader(path)
    if _field(reader, "clip.projector_type") != PROJECTOR_TYPE:
        raise ValueError(f"{path}: projector type is not {PROJECTOR_TYPE}")
    if not _field(reader, "clip.use_gelu"):
        raise ValueError(f"{path}: clip.use_gelu is off; llama.cpp would use quick GELU in the FFN")
    layers = _int(reader, "clip.vision.block_count")
    if list(_field(reader, "clip.vision.feature_layer")) != [layers]:  # type: ignore[call-overload]
        raise ValueError(f"{path}: clip.vision.feature_layer must be [{layers}] so that every layer runs")
    tensors = {t.name: t for t in reader.tensors}
    config = VisionConfig(
        image_size=_int(reader, "clip.vision.image_size"),
        patch_size=_int(reader, "clip.vision.patch_size"),
        width=_int(reader, "clip.vision.embedding_length"),
        layers=layers,
        heads=_int(reader, "clip.vision.attention.head_count"),
        ffn=_int(reader, "clip.vision.feed_forward_length"),
        projector_hidden=int(tensors["mm.0.weight"].shape[1]),  # shape is ggml's ne = [in, out]
        out_width=int(tensors["mm.2.weight"].shape[1]),
        image_mean=_floats(reader, "clip.vision.image_mean"),  # type: ignore[arg-type]
        image_std=_floats(reader, "clip.vision.image_std"),  # type: ignore[arg-type]
        eps=float(_field(reader, "clip.vision.attention.layer_norm_epsilon")),  # type: ignore[arg-type]
        post_ln="v.post_ln.weight" in tensors,
    )
    model = VisionEncoder(config)
    state = {}
    for torch_name, gguf_name in gguf_tensor_names(config).items():
        if gguf_name not in tensors:
            raise ValueError(f"{path}: tensor {gguf_name} missing")
        # GGUFReader gives the data in numpy order already (ggml's ne reversed).
        array = np.asarray(tensors[gguf_name].data, dtype=np.float32)
        state[torch_name] = torch.from_numpy(array.copy())
    model.load_state_dict(state)
    return model.eval()


if __name__ == "__main__":
    # Smoke check: the default model's size and output shape.
    cfg = VisionConfig()
    enc = VisionEncoder(cfg)
    out = enc(torch.randint(0, 256, (2, cfg.image_size, cfg.image_size, 3), dtype=torch.uint8))
    print(f"{sum(p.numel() for p in enc.parameters()) / 1e6:.2f} M parameters, output {list(out.shape)}")
