"""What the benchmark scripts share: the model pair they run, and the machine they record beside every figure."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import llama_cpp

DEMO_MMPROJ = "smollm2-mmproj-random.gguf"  # written by scripts/make_fixtures.py
# The speed and memory benchmarks feed synthetic frames of a camera's 4:3 shape, the size their committed
# results were measured with (the scenes' own frames are 96 x 96; SyntheticSource resizes them).
FRAME_SIZE = (320, 240)


def add_model_arguments(parser: argparse.ArgumentParser, fixtures: Path) -> None:
    """--model, --mmproj and --threads, defaulting to SmolLM2-135M behind the random 64-token projector."""
    parser.add_argument("--model", default="smollm2", help="text model GGUF (default: SmolLM2-135M from its wheel)")
    parser.add_argument("--mmproj", type=Path, default=fixtures / DEMO_MMPROJ,
                        help="mmproj (default: the random 64-token projector of scripts/make_fixtures.py)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)


def check_model_arguments(args: argparse.Namespace) -> None:
    if not args.mmproj.exists():
        sys.exit(f"{args.mmproj} not found: run python -m scripts.make_fixtures first")



def machine_info() -> dict[str, object]:
    """CPU, cores and the llama.cpp build: the context a timing needs to be read."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = None  # what llama.cpp's CUDA build runs on, where there is one
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "machine": platform.machine(), "gpu": gpu,
            "python": sys.version.split()[0],
            "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip()}


def save_figure(fig: object, axes: list, path: Path) -> None:
    """The benchmarks' common finish: light grid and small legend on every axis, tight layout, 110 dpi PNG."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
