"""Checkpoints of one video memory, so that it survives a restart: the one owner of the on-disk format.

`save(session, directory)` writes the whole memory: llama.cpp's sequence state (the KV cache), the slot
tables, the frame records and counters, the conversation, and what must match to put it back (settings,
policy, file digests, llama.cpp's version). `restore(session, directory)` puts it back into a fresh Session
made with the same model and settings, before its first frame; the next-token logits are then the ones
before the checkpoint, bit for bit (tests/test_checkpoint.py).

The directory holds (one writer per directory):
    memory.ckpt        the newest complete checkpoint
    memory.prev.ckpt   the one before: used when the newest is damaged, or missing after a crash mid-save
    memory.ckpt.tmp    a checkpoint being written; never read, overwritten by the next save
    lock               held (flock) by the process that writes here: a second one is refused (DirectoryLock)

A .ckpt file, little-endian:
    offset  0   8 bytes   magic b"EDGEMEM\\0"
            8   u32       format version (FORMAT_VERSION)
           12   u32       flags (0)
           16   u64       bytes of the JSON metadata
           24   u64       bytes of the state blob
           32   u64       bytes of the slot tables
           40   32 bytes  SHA-256 of bytes [0, 40) and of everything from byte 72 on
           72   the JSON metadata (UTF-8), the state blob, the slot tables (frame, patch, rot_pos: int32 [L, H, n])
Why each choice:
    - a fixed header with the three lengths: a truncated file is known by its size before anything is parsed;
    - JSON metadata: a few KB that a person can read (head -c), new keys need no new format version;
    - the state blob as llama_state_seq_get_data wrote it: llama.cpp reads its own format back, no conversion;
    - the tables as raw int32: numpy maps them back with frombuffer (4 MB at |M| = 4096 on SmolLM2-135M);
    - one SHA-256 over everything but itself: any flipped byte, header included, refuses the file (hashlib
      costs a fraction of the write, see CheckpointPolicy);
    - explicit little-endian ('<' structs, '<i4' arrays): a checkpoint from an x86 box reads on an ARM one.

A save is atomic in SQLite's sense: the new file is written under memory.ckpt.tmp and fsynced, the newest is
renamed to memory.prev.ckpt, the new one renamed to memory.ckpt, and the directory fsynced after each rename.
Whenever the process dies, the directory holds at least one complete checkpoint (once one was saved), and
restore() reads memory.ckpt, then memory.prev.ckpt: a file that fails its checks is skipped with a one-line
warning, never loaded.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import llama_cpp
import llama_cpp._ggml
import numpy as np

from edge_runtime.errors import ModelError, SettingsError
from edge_runtime.memory import FrameRecord, SlotTable
from edge_runtime.policies import settings_of

if TYPE_CHECKING:
    from edge_runtime.session import Session

log = logging.getLogger(__name__)

MAGIC = b"EDGEMEM\0"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQQQ32s")  # magic, version, flags, meta / state / table lengths, SHA-256
_DIGEST_AT = 40  # the SHA-256 covers [0, 40) and [72, end)
NEWEST, PREVIOUS, TEMPORARY, LOCK = "memory.ckpt", "memory.prev.ckpt", "memory.ckpt.tmp", "lock"
_STATE_MAGIC = 0xAF143CD8  # llama.cpp's sequence state starts so (native/kv_state.hpp)
# Answer-time settings a restart may change: they never touch what the memory holds. direct_pass too: the
# in-place and the copying pass leave byte-identical states (tests/test_direct_pass.py).
_FREE_SETTINGS = {"max_answer_tokens", "history_tokens", "temperature", "seed", "direct_pass"}


class CheckpointMismatch(SettingsError):
    """A checkpoint made with another model, settings or llama.cpp: refused, the files left as they are."""


class CorruptCheckpoint(Exception):
    """A checkpoint file that fails its checks (truncated, a flipped byte, not a checkpoint)."""


@dataclass
class CheckpointPolicy:
    """When a stream saves its memory."""

    directory: Path
    # Seconds between checkpoints: a save of SmolLM2-135M's memory at |M| = 4096 (a 99.6 MB file) took 0.57-0.79 s
    # on a shared 2-core box (copy out, SHA-256, write, fsync), so 120 s keeps it at ~0.6 % of stream time,
    # under the 1 % asked, with room for a slower SD card; a crash loses at most two minutes of video.
    checkpoint_every: float = 120.0
    last_save: float | None = None  # time.monotonic() of the last save

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.last_save is None or now - self.last_save >= self.checkpoint_every

    def maybe_save(self, session: Session, now: float | None = None) -> SaveReport | None:
        """Save if the interval has passed since the last save (the first call saves)."""
        now = time.monotonic() if now is None else now
        if not self.due(now):
            return None
        report = save(session, self.directory)
        self.last_save = now
        return report


class DirectoryLock:
    """The one writer of a checkpoint directory: two processes saving into one directory would each restore the
    other's memory. An flock, so that it dies with its process (a SIGKILL leaves no stale lock behind)."""

    def __init__(self, directory: str | Path) -> None:
        import fcntl  # POSIX only, as the fsync of a directory is

        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SettingsError(f"cannot use {self.directory} for the memory: {e.strerror}; give a directory "
                                "this user can write (--memory-dir)") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._fd)
            raise SettingsError(f"{self.directory} is in use by another edge-runtime (pid {holder}): give each "
                                "stream its own --memory-dir") from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing drops the flock
            self._fd = -1


@dataclass(frozen=True)
class SaveReport:
    path: Path
    bytes: int
    seconds: float
    frames_seen: int


@dataclass(frozen=True)
class RestoreReport:
    path: Path  # the file restored: memory.ckpt, or memory.prev.ckpt when the newest was unusable
    frames_seen: int
    frames_in_memory: int
    video_tokens: int
    passes: int
    last_timestamp: float | None  # of the last frame before the checkpoint, for a source that can seek
    saved_at: float  # time.time() of the save
    skipped: tuple[str, ...]  # one line per newer file that was unusable
    seconds: float


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint file read and verified (checksum, lengths); what it holds is not yet checked against a session."""

    path: Path
    meta: dict
    state: memoryview  # writable (over a bytearray): llama.cpp reads it without another copy
    tables: tuple[np.ndarray, np.ndarray, np.ndarray]


# -- identities ------------------------------------------------------------------------------------------

_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, hashed once per process for each (path, size, mtime): a text model can be GBs."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def llama_cpp_build() -> str:
    """The llama.cpp build under llama-cpp-python: ggml's version and commit (the library exports both; the
    Python bindings do not wrap them), or "unknown"."""
    try:
        lib = llama_cpp._ggml.libggml
        parts = []
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = ctypes.c_char_p, []
            parts.append(fn().decode())
        return f"ggml {parts[0]} ({parts[1]})"
    except (AttributeError, OSError, UnicodeDecodeError):
        return "unknown"


def _identity(session: Session) -> dict:
    cfg = session.model.config
    return {
        "model_sha256": file_sha256(cfg.model_path),
        "mmproj_sha256": file_sha256(cfg.mmproj_path),
        "lora_sha256": file_sha256(cfg.lora_path) if cfg.lora_path is not None else None,
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_build": llama_cpp_build(),
        "model_path": str(cfg.model_path),  # for the messages only: a moved file is the same file
        "mmproj_path": str(cfg.mmproj_path),
        "lora_path": str(cfg.lora_path) if cfg.lora_path is not None else None,
    }


def _settings(session: Session) -> dict:
    cfg, mem, model = session.config, session.memory, session.model
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _FREE_SETTINGS}
    policy = session.policy
    return json.loads(json.dumps({  # as it will read back (tuples become lists)
        "session": config,
        "policy": {"name": policy.name,
                   "settings": {k: getattr(policy, k) for k in settings_of(type(policy))}},
        "family": model.family.name,
        "positions": cfg.positions,
        "budget": mem.budget,
        "n_ctx": session.context.n_ctx,
        "capacity": mem.capacity,
        "prefix_tokens": mem.prefix_tokens,
        "mrope": mem.mrope,
        "cache_type": model.config.cache_type,
        "flash_attn": model.config.flash_attn,
        "frame_side": model.config.frame_side,
        "slot_shape": list(mem.slots.frame.shape[:2]),
    }))


def _policy_state(session: Session) -> dict:
    """Random generators a policy keeps beside its settings (RandomTokens), so that it goes on where it was."""
    policy = session.policy
    return {f.name: getattr(policy, f.name).bit_generator.state for f in dataclasses.fields(policy)
            if not f.init and isinstance(getattr(policy, f.name, None), np.random.Generator)}


# -- save ------------------------------------------------------------------------------------------------

def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(session: Session, directory: str | Path, last_timestamp: float | None = None) -> SaveReport:
    """Write a checkpoint of the session's whole memory into `directory` (made if missing), atomically,
    keeping the previous one as memory.prev.ckpt. last_timestamp: the stream's (default: the last frame's)."""
    t0 = time.perf_counter()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    mem = session.memory
    state = session.context.state_bytes()
    n_cells = struct.unpack_from("<IiII", state)[3] if len(state) >= 16 else -1
    if n_cells != mem.prefix_tokens + mem.video_tokens:  # the bookkeeping and llama.cpp disagree: a bug
        raise ModelError(f"the KV state holds {n_cells} cells but the memory records "
                         f"{mem.prefix_tokens + mem.video_tokens}; not saving a checkpoint of it")
    tables = b"".join(np.ascontiguousarray(t, dtype="<i4").tobytes() for t in mem.slots.arrays())
    if last_timestamp is None and mem.records:
        last_timestamp = mem.records[-1].timestamp
    meta = json.dumps({
        "format": FORMAT_VERSION,
        "saved_at": time.time(),
        "identity": _identity(session),
        "settings": _settings(session),
        "memory": {"next_pos": mem.next_pos, "passes": mem.passes, "frames_since_pass": mem.frames_since_pass,
                   "n_slots": mem.video_tokens, "records": [dataclasses.astuple(r) for r in mem.records]},
        "policy_state": _policy_state(session),
        "history": [list(turn) for turn in session.history],
        "frames_seen": session.frames_seen,
        "last_timestamp": last_timestamp,
        "state_cells": n_cells,
    }, separators=(",", ":")).encode()
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(meta), len(state), len(tables), b"")[:_DIGEST_AT]
    digest = hashlib.sha256(head)
    for part in (meta, state, tables):
        digest.update(part)
    tmp, newest = directory / TEMPORARY, directory / NEWEST
    with open(tmp, "wb") as f:
        for part in (head, digest.digest(), meta, state, tables):
            f.write(part)
        f.flush()
        os.fsync(f.fileno())
    if newest.exists():
        os.replace(newest, directory / PREVIOUS)
        _fsync_dir(directory)
    os.replace(tmp, newest)
    _fsync_dir(directory)
    return SaveReport(path=newest, bytes=_HEADER.size + len(meta) + len(state) + len(tables),
                      seconds=time.perf_counter() - t0, frames_seen=session.frames_seen)


# -- read ------------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify one checkpoint file; CorruptCheckpoint (one line) if it is truncated or damaged."""
    path = Path(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        if f.readinto(data) != size:
            raise CorruptCheckpoint(f"checkpoint {path} changed while it was read")
    if size < _HEADER.size or data[:8] != MAGIC:
        raise CorruptCheckpoint(f"checkpoint {path} is not an edge-runtime checkpoint or is truncated "
                                f"({size} bytes)")
    _, version, _, n_meta, n_state, n_tables, digest = _HEADER.unpack_from(data)
    if version != FORMAT_VERSION:  # intact, but not ours to read: refused like a mismatch, never skipped
        raise CheckpointMismatch(f"checkpoint {path} has format {version}; this edge-runtime reads format "
                                 f"{FORMAT_VERSION}: restore with the edge-runtime that wrote it, or use another "
                                 "checkpoint directory to start fresh")
    if _HEADER.size + n_meta + n_state + n_tables != size:
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or damaged: {size} bytes, its header says "
                                f"{_HEADER.size + n_meta + n_state + n_tables}")
    view = memoryview(data)
    h = hashlib.sha256(view[:_DIGEST_AT])
    h.update(view[_HEADER.size:])
    if h.digest() != digest:
        raise CorruptCheckpoint(f"checkpoint {path} is damaged: its SHA-256 does not match its contents")
    at = _HEADER.size
    try:
        meta = json.loads(bytes(view[at:at + n_meta]))
        shape = (*meta["settings"]["slot_shape"], meta["memory"]["n_slots"])
        count = int(np.prod(shape))
        if 3 * 4 * count != n_tables:
            raise ValueError("table size")
    except (ValueError, KeyError, TypeError) as e:  # a checksummed file that is not what we write: a bug
        raise CorruptCheckpoint(f"checkpoint {path} has unreadable metadata ({e})") from None
    at += n_meta
    state = view[at:at + n_state]
    at += n_state
    tables = tuple(np.frombuffer(data, "<i4", count, at + i * 4 * count).reshape(shape).astype(np.int32)
                   for i in range(3))
    return Checkpoint(path=path, meta=meta, state=state, tables=tables)


# -- restore ---------------------------------------------------------------------------------------------

_WHAT = {"model_sha256": "text model", "mmproj_sha256": "mmproj", "lora_sha256": "LoRA"}


def _short(value: object) -> str:
    if isinstance(value, str) and len(value) == 64:
        return value[:12]  # a digest
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def mismatch(session: Session, ckpt: Checkpoint) -> str | None:
    """One line that says what differs between the checkpoint and this session and what to do, or None."""
    saved, now = ckpt.meta["identity"], _identity(session)
    where = f"checkpoint {ckpt.path} was made"
    todo = f"or use another checkpoint directory than {ckpt.path.parent} to start fresh"
    for key, what in _WHAT.items():
        if saved[key] != now[key]:
            path_key = key.replace("_sha256", "_path")
            if saved[key] is None or now[key] is None:
                having = "with" if saved[key] else "without"
                return (f"{where} {having} a {what} ({saved[path_key]}), this session has "
                        f"{now[path_key] or 'none'}: restore with the same {what}, {todo}")
            return (f"{where} with another {what} (sha256 {_short(saved[key])}..., {saved[path_key]}) than "
                    f"{now[path_key]} (sha256 {_short(now[key])}...): restore with the same {what}, {todo}")
    for key, what in (("llama_cpp_python", "llama-cpp-python"), ("llama_cpp_build", "llama.cpp build")):
        if saved[key] != now[key]:
            return (f"{where} by {what} {saved[key]}, this is {now[key]} (its KV state format may differ): "
                    f"install {what} {saved[key]}, {todo}")
    saved_s, now_s = ckpt.meta["settings"], _settings(session)
    order = ["family", "budget", "positions", "policy", "n_ctx", "cache_type", "flash_attn", "frame_side", "mrope",
             "session", "capacity", "prefix_tokens", "slot_shape"]
    for key in order + sorted((set(saved_s) | set(now_s)) - set(order)):
        a, b = saved_s.get(key), now_s.get(key)
        if a == b:
            continue
        if key == "policy":
            if a["name"] != b["name"]:
                return f"{where} with the {a['name']} policy, this session has {b['name']}: use {a['name']}, {todo}"
            key, a, b = "policy setting", a["settings"], b["settings"]
        if isinstance(a, dict) and isinstance(b, dict):
            sub = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
            key, a, b = f"{key} {sub}", a.get(sub), b.get(sub)
        return f"{where} with {key} {_short(a)}, this session has {_short(b)}: restart with {_short(a)}, {todo}"
    return None


def _check_state(ckpt: Checkpoint, prefix_tokens: int) -> None:
    meta = ckpt.meta
    header = struct.unpack_from("<IiII", ckpt.state) if len(ckpt.state) >= 16 else (0, 0, 0, -1)
    cells = prefix_tokens + meta["memory"]["n_slots"]
    if header[0] != _STATE_MAGIC or header[3] != cells or meta["state_cells"] != cells:
        raise CorruptCheckpoint(f"checkpoint {ckpt.path} is inconsistent: its KV state holds {header[3]} cells, "
                                f"its bookkeeping {cells}")


def restore(session: Session, directory: str | Path) -> RestoreReport | None:
    """Put the memory saved in `directory` back into a fresh session (same model and settings, nothing
    ingested yet): the newest usable checkpoint, or None (start fresh, said in one line) if there is none.

    A damaged file is skipped with a one-line warning; a checkpoint made with another model, settings or
    llama.cpp raises CheckpointMismatch (one line) and nothing is changed, on disk or in the session.
    """
    t0 = time.perf_counter()
    directory = Path(directory)
    mem = session.memory
    if session.frames_seen or mem.records or mem.video_tokens or session.history:
        raise SettingsError("a checkpoint can only be restored into a fresh session, before its first frame")
    skipped: list[str] = []
    for name in (NEWEST, PREVIOUS):
        path = directory / name
        if not path.is_file():
            continue
        try:
            ckpt = read_checkpoint(path)
            why = mismatch(session, ckpt)
            if why:
                raise CheckpointMismatch(why)
            _check_state(ckpt, mem.prefix_tokens)
            m = ckpt.meta["memory"]
            records = [FrameRecord(*r) for r in m["records"]]
            # Load into a scratch memory first: the session's is only replaced once llama.cpp took the state.
            loaded = dataclasses.replace(mem, slots=SlotTable(*mem.slots.frame.shape), records=[])
            loaded.load(next_pos=m["next_pos"], passes=m["passes"], frames_since_pass=m["frames_since_pass"],
                        records=records, frame=ckpt.tables[0], patch=ckpt.tables[1], rot_pos=ckpt.tables[2])
        except CorruptCheckpoint as e:
            skipped.append(str(e))
            log.warning("%s; trying an older one", e)
            continue
        except ValueError as e:  # checksummed but inconsistent bookkeeping: not something we wrote
            if isinstance(e, SettingsError):
                raise
            skipped.append(f"checkpoint {path} is inconsistent: {e}")
            log.warning("%s; trying an older one", skipped[-1])
            continue
        fresh = session.context.state_bytes()  # the prompt alone: put back if llama.cpp refuses the blob
        try:
            session.context.set_state_bytes(ckpt.state)
        except ModelError:
            session.context.set_state_bytes(fresh)
            raise
        session.memory = loaded
        session.history = [(q, a) for q, a in ckpt.meta["history"]]
        session.frames_seen = ckpt.meta["frames_seen"]
        for field_name, state in ckpt.meta["policy_state"].items():
            getattr(session.policy, field_name).bit_generator.state = state
        return RestoreReport(path=path, frames_seen=session.frames_seen, frames_in_memory=len(loaded.records),
                             video_tokens=loaded.video_tokens, passes=loaded.passes,
                             last_timestamp=ckpt.meta["last_timestamp"], saved_at=ckpt.meta["saved_at"],
                             skipped=tuple(skipped), seconds=time.perf_counter() - t0)
    if skipped:
        log.warning("no usable checkpoint in %s: starting with an empty memory", directory)
    else:
        log.info("no checkpoint in %s yet: starting with an empty memory", directory)
    return None
