"""What llama.cpp's API does not tell about a GGUF file, read from the file itself."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf

from edge_runtime.errors import ModelError

GGUF_MAGIC = b"GGUF"
# By mmproj projector type (clip.projector_type, as tools/mtmd/clip-impl.h names them): M-RoPE projectors
# whose frames may take any size, 28 px a token.
QWEN_PROJECTORS = ("qwen2vl_merger", "qwen2.5vl_merger", "qwen3vl_merger")


def projector_info(path: Path) -> tuple[str, int, int]:
    """(projector type, px per output token side, tokens of one view) of an mmproj, from its GGUF metadata
    (llama.cpp has no API for them).

    px per token: patch_size x spatial merge for M-RoPE projectors (Qwen2/2.5-VL: 14 x 2 = 28), else 0.
    Tokens of one view: (image_size / patch_size / scale_factor)^2 for idefics3 (SmolVLM2-256M: 512 / 16 / 4
    -> 64; clip.cpp clip_n_output_tokens), else 0.
    """
    reader = gguf.GGUFReader(path)

    def value(key: str) -> object:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    projector = str(value("clip.projector_type") or value("clip.vision.projector_type") or "")
    patch = int(value("clip.vision.patch_size") or 0)
    merge = int(value("clip.vision.spatial_merge_size") or 2)  # clip.cpp's default for Qwen-VL
    token_px = patch * merge if projector in QWEN_PROJECTORS else 0
    view_tokens = 0
    if projector == "idefics3" and patch:
        side = int(value("clip.vision.image_size") or 0) // patch // int(value("clip.vision.projector.scale_factor")
                                                                          or 1)
        view_tokens = side * side
    return projector, token_px, view_tokens


def gguf_int_array(path: Path, key: str) -> list[int]:
    """One integer array of a GGUF's metadata ([] if absent), read by walking the header only.

    gguf.GGUFReader would do, but it makes a numpy view of every token of the vocabulary first (seconds).
    """
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        off = 8  # magic, version

        def take(fmt: str) -> int:
            nonlocal off
            (v,) = struct.unpack_from("<" + fmt, m, off)
            off += struct.calcsize(fmt)
            return v

        def skip(vtype: int) -> None:
            nonlocal off
            if vtype == 8:  # string
                n = take("Q")
                off += n
            elif vtype == 9:  # array
                etype, n = take("I"), take("Q")
                if etype in scalar:
                    off += n * struct.calcsize(scalar[etype])
                else:
                    for _ in range(n):
                        skip(etype)
            else:
                off += struct.calcsize(scalar[vtype])

        take("Q")  # tensors
        for _ in range(take("Q")):
            n = take("Q")
            name = bytes(m[off: off + n]).decode(errors="replace")
            off += n
            vtype = take("I")
            if name == key and vtype == 9:
                etype, n = take("I"), take("Q")
                if etype not in scalar:
                    return []
                return [int(take(scalar[etype])) for _ in range(n)]
            skip(vtype)
    return []


def check_gguf(path: Path, what: str, flag: str) -> None:
    if not path.is_file():
        raise ModelError(f"{what} not found: {path} (pass an existing GGUF file with {flag})")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{what} {path} is not a GGUF file (bad magic); re-download or re-convert it")
