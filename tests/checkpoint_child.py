"""The process tests/test_checkpoint.py's crash test kills: restore, check, then stream and checkpoint every frame.

    PYTHONPATH=tests python tests/checkpoint_child.py MODEL MMPROJ DIRECTORY PAUSE_S

Prints one line per event, flushed: "RESTORED <frames_seen> <logits sha256> <file>" or "FRESH", then "READY",
then per frame "SAVING <frames_seen> <logits sha256>" before its checkpoint and "SAVED <frames_seen>" after.
The logits are tests/probes.py's probe on the memory, so the parent can check that a restored memory is the
one saved, bit for bit, across processes.

PAUSE_S widens the windows inside save() so that kills land in them: os.fsync and os.replace sleep that long
before doing their real work (in this process only; the checkpoint code is the shipped one, unchanged).
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import sys
import time
from pathlib import Path

from probes import probe_logits

from edge_runtime import checkpoint
from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.policies import InfiniPotV
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

BUDGET = 64  # 4 frames of the tiny 4 x 4 projector: a pass every frame or two


def scene(seed: int, n_frames: int):
    """The synthetic frames the checkpoint tests stream (the one place that names the source's class)."""
    return SyntheticSource(seed=seed, n_frames=n_frames)


def slowed(fn, pause: float):
    def call(*args, **kwargs):
        time.sleep(pause)
        return fn(*args, **kwargs)
    return call


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def logits_digest(session: Session) -> str:
    return hashlib.sha256(probe_logits(session.context, session.memory.next_pos).tobytes()).hexdigest()


def main() -> None:
    model_path, mmproj_path, directory, pause = sys.argv[1], sys.argv[2], Path(sys.argv[3]), float(sys.argv[4])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    if pause > 0:
        os.fsync, os.replace = slowed(os.fsync, pause), slowed(os.replace, pause)
    model = VisionLanguageModel(ModelConfig(Path(model_path), Path(mmproj_path), n_threads=1))
    session = Session(model, SessionConfig(budget=BUDGET, question_room=128, max_answer_tokens=4),
                      InfiniPotV())
    report = checkpoint.restore(session, directory)
    mem = session.memory
    if report is None:
        say("FRESH")
    else:
        # The memory is consistent: the bookkeeping, llama.cpp's cells and the frame count agree.
        cells = struct.unpack_from("<IiII", session.context.state_bytes())[3]
        assert cells == mem.prefix_tokens + mem.video_tokens, (cells, mem.prefix_tokens, mem.video_tokens)
        assert mem.records and mem.records[-1].index == session.frames_seen - 1, (mem.records, session.frames_seen)
        assert 0 < mem.video_tokens <= BUDGET
        say(f"RESTORED {session.frames_seen} {logits_digest(session)} {report.path.name}")
        answer = session.ask("What moved?", max_tokens=3)
        assert answer.frames == session.frames_seen
    say("READY")
    for i, frame in enumerate(scene(seed=5, n_frames=100_000)):
        if i < session.frames_seen:
            continue  # a source that can seek would start at report.last_timestamp
        session.insert_frame(frame)
        say(f"SAVING {session.frames_seen} {logits_digest(session)}")
        checkpoint.save(session, directory)
        say(f"SAVED {session.frames_seen}")


if __name__ == "__main__":
    main()
