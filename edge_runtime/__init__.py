"""edge-runtime: streaming video understanding on small devices, in a KV memory that does not grow."""

from __future__ import annotations

import ctypes
import importlib
import os
import sys
from typing import Any

# OpenCV and FFmpeg write warnings straight to stderr, past `logging`; a failed open would print three
# lines of noise above our one-line error. They read these once, before cv2 is imported; the user's
# own settings win, and --verbose turns them back on for captures opened later.
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET


def _make_libstdcxx_global() -> None:
    """Put the C++ runtime in the process's global symbol scope before llama.cpp's libraries load.

    llama_cpp dlopens libggml*.so and libllama.so with RTLD_GLOBAL. A CUDA build's libggml-cuda.so exports
    C++ runtime symbols of its own; when libstdc++ came in earlier as a local dependency (cv2 imported first
    loads it RTLD_LOCAL), it is not in the global scope, so libllama's references bind to libggml-cuda's
    copies and the tokenizer's std::regex crashes (the shared notes, "On a CUDA build"). dlopen with
    RTLD_GLOBAL promotes an object already loaded locally, so this works whether cv2 came first or not.
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libstdc++.so.6", mode=ctypes.RTLD_GLOBAL)
        except OSError:  # musl or a static runtime: nothing to promote
            pass


_make_libstdcxx_global()

# The public names load on first use, so that the pure-NumPy modules (edge_runtime.scenes) import on a
# training machine that has neither llama.cpp nor OpenCV.
_EXPORTS = {
    "ModelConfig": "edge_runtime.model", "VisionLanguageModel": "edge_runtime.model",
    "ModelError": "edge_runtime.errors", "SettingsError": "edge_runtime.errors", "MemoryFull": "edge_runtime.errors",
    "Answer": "edge_runtime.session", "Session": "edge_runtime.session", "SessionConfig": "edge_runtime.session",
    "Status": "edge_runtime.session", "FrameRecord": "edge_runtime.memory",
    "POLICIES": "edge_runtime.policies", "make_policy": "edge_runtime.policies",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
