"""scripts/vlm_vision.py: the PyTorch vision encoder computes what llama.cpp computes from its export.

The trainer optimises the PyTorch model and ships the GGUF, so any graph difference (a skipped last
layer, quick GELU instead of GELU, a missing post-norm, transposed weights) would silently cost accuracy
at run time. These tests export random models, run them through the real mtmd next to SmolLM2-135M, and
compare with PyTorch within the tolerance of scripts/check_mmproj.py (fp16 arithmetic in llama.cpp).
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def vision() -> ModuleType:
    from scripts import vlm_vision

    return vlm_vision


@pytest.fixture(scope="module")
def check() -> ModuleType:
    from scripts import check_mmproj

    return check_mmproj


def random_frames(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# 36 tokens, 4 layers with post_ln (the default); 64 tokens, 2 narrow layers, no post_ln, CLIP statistics.
CONFIGS = {
    "96px-4-layers": {},
    "128px-2-layers": dict(image_size=128, width=64, layers=2, heads=2, ffn=96, projector_hidden=128,
                           post_ln=False, image_mean=(0.48145466, 0.4578275, 0.40821073),
                           image_std=(0.26862954, 0.26130258, 0.27577711), eps=1e-6),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_llama_cpp_matches_torch(vision: ModuleType, check: ModuleType, tmp_path: Path, name: str) -> None:
    pytest.importorskip("llama_cpp")
    from edge_runtime.model import ModelConfig, VisionLanguageModel, resolve_model

    config = vision.VisionConfig(**CONFIGS[name])
    torch.manual_seed(0)
    path = vision.export_mmproj(vision.VisionEncoder(config), config, tmp_path / "mmproj.gguf")
    reference = vision.load_mmproj(path)
    frames = random_frames(3, config.image_size, seed=1)
    frames[0] = 0  # extremes of the pixel range, where normalisation errors would show most
    frames[1] = 255
    with torch.no_grad():
        want = reference(torch.from_numpy(frames)).numpy()
    with VisionLanguageModel(ModelConfig(resolve_model("smollm2"), path, n_threads=2,
                                         use_gpu=False)) as model:
        got = np.stack([model.frame_embeddings(frame) for frame in frames])
    assert got.shape == (3, config.n_patches, config.out_width)
    for g, w in zip(got, want, strict=True):
        stats = check.compare(g, w)
        assert stats["rel_error"] <= check.REL_TOLERANCE, stats
        assert stats["min_cosine"] >= check.MIN_COSINE, stats


def test_tolerance_catches_the_likely_wrong_graphs(vision: ModuleType, check: ModuleType,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # llama.cpp's defaults for llava graphs, had export_mmproj not overridden them: quick GELU, and
    # stopping one layer early. The tolerance must not let either through.
    config = vision.VisionConfig()
    torch.manual_seed(0)
    model = vision.VisionEncoder(config).eval()
    x = torch.from_numpy(random_frames(1, config.image_size, seed=2))
    with torch.no_grad():
        want = model(x)[0].numpy()
        monkeypatch.setattr(vision, "gelu", lambda t, ggml_numerics=False: t * torch.sigmoid(1.702 * t))
        quick = model(x)[0].numpy()
        monkeypatch.undo()
        model.blocks = model.blocks[:-1]
        early = model(x)[0].numpy()
    assert check.compare(quick, want)["rel_error"] > 2 * check.REL_TOLERANCE
    assert check.compare(early, want)["rel_error"] > 20 * check.REL_TOLERANCE


def test_export_load_round_trip_is_exact(vision: ModuleType, tmp_path: Path) -> None:
    config = vision.VisionConfig(**CONFIGS["128px-2-layers"])
    torch.manual_seed(0)
    model = vision.VisionEncoder(config)
    # f32: every weight comes back bit for bit.
    loaded = vision.load_mmproj(vision.export_mmproj(model, config, tmp_path / "f32.gguf", dtype="f32"))
    assert loaded.config == config
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    # f16: matrices come back rounded to fp16, norms and biases exactly; and re-exporting the loaded
    # model rewrites the same bytes, so a trained file can be re-checked and re-shipped unchanged.
    f16 = vision.export_mmproj(model, config, tmp_path / "f16.gguf")
    loaded = vision.load_mmproj(f16)
    for name, value in model.state_dict().items():
        expected = value.half().float() if value.ndim >= 2 else value
        assert torch.equal(loaded.state_dict()[name], expected), name
    again = vision.export_mmproj(loaded, loaded.config, tmp_path / "again.gguf")
    assert again.read_bytes() == f16.read_bytes()


def test_wrong_out_width_gives_mtmds_one_line_error(vision: ModuleType, tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel, resolve_model

    config = vision.VisionConfig(**{**CONFIGS["128px-2-layers"], "out_width": 64})
    path = vision.export_mmproj(vision.VisionEncoder(config), config, tmp_path / "w64.gguf")
    with pytest.raises(ModelError, match=r"mismatch between text model \(n_embd = 576\) and mmproj \(n_embd = 64\)"):
        VisionLanguageModel(ModelConfig(resolve_model("smollm2"), path, n_threads=2, use_gpu=False))


def test_frames_of_another_size_are_refused(vision: ModuleType) -> None:
    # mtmd would resize them (bicubic, padded), which the PyTorch model does not reproduce.
    model = vision.VisionEncoder(vision.VisionConfig())
    with pytest.raises(ValueError, match="expected RGB images"):
        model(torch.zeros(1, 64, 64, 3, dtype=torch.uint8))


def test_ggml_numerics_gelu_is_the_fp16_table_with_a_smooth_gradient(vision: ModuleType) -> None:
    x = torch.tensor([-12.0, -10.0, -1.2345, 0.1, 1.0, 3.14159, 9.99, 10.0, 25.0], requires_grad=True)
    y = vision.gelu(x, ggml_numerics=True)
    # ggml-cpu (vec.h): 0 at or below -10, x at or above 10, else fp16(gelu_tanh(fp16(x))).
    inside = torch.nn.functional.gelu(x.detach().half().float(), approximate="tanh").half().float()
    expected = torch.where(x <= -10, 0.0, torch.where(x >= 10, x.detach(), inside))
    assert torch.equal(y.detach(), expected)
    y.sum().backward()
    smooth = torch.autograd.grad(torch.nn.functional.gelu(x, approximate="tanh").sum(), x)[0]
    assert torch.equal(x.grad, smooth)
