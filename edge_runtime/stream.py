"""One watched stream, driven by the thread that owns llama.cpp: the frames of its feed go into its session,
questions are answered from its memory, watch prompts are asked on the stream's clock, and the memory is
checkpointed to its directory so that it survives a restart.

    stream = Stream(session, feed, out, StreamParams(memory_dir=Path("mem")))
    stream.start()                      # restores the memory saved in mem/, then starts the feed
    while stream.poll(timeout=0.05):    # one frame (or notice) at a time
        ...                             # questions go in between: stream.ask("what came in?")
    stream.close()                      # the last checkpoint, the directory released

Everything a person or a program sees goes through `out` (edge_runtime.output.Output's methods).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edge_runtime import checkpoint
from edge_runtime.checkpoint import CheckpointPolicy, DirectoryLock, RestoreReport
from edge_runtime.errors import MemoryFull, ModelError, SettingsError
from edge_runtime.feed import FeedEnd, FrameFeed, Notice
from edge_runtime.session import Answer, Session
from edge_runtime.sources import Frame

if TYPE_CHECKING:
    from edge_runtime.output import Output

log = logging.getLogger(__name__)


MATCHES = ("starts_with", "contains", "equals")  # how a watch prompt's answer is tested, case-insensitive


@dataclass
class WatchPrompt:
    """A question asked every `every` seconds of stream time (--ask-every; an alert under serve). With a
    condition (`match` applied to `text`), an answer that meets it is an alert."""

    prompt: str
    every: float
    match: str | None = None  # one of MATCHES, or None: every answer is just an answer
    text: str = ""
    id: str = ""
    next_due: float | None = None  # stream time of the next ask; set when the stream takes it

    def __post_init__(self) -> None:
        if not self.every > 0:
            raise SettingsError(f"a watch prompt needs a positive interval in seconds, not {self.every}")
        if self.match is not None and self.match not in MATCHES:
            raise SettingsError(f"a watch prompt's condition is one of {', '.join(MATCHES)}, not {self.match!r}")

    def fires(self, answer: str) -> bool:
        if self.match is None:
            return False
        a, t = answer.strip().lower(), self.text.strip().lower()
        return {"starts_with": a.startswith(t), "contains": t in a, "equals": a == t}[self.match]


@dataclass
class StreamParams:
    name: str = "stream"
    memory_dir: Path | None = None  # None: the memory lives in RAM only
    checkpoint_every: float = CheckpointPolicy.checkpoint_every
    watches: tuple[WatchPrompt, ...] = ()  # asked on the stream's clock (more can be added: Stream.watch)
    max_frames: int | None = None  # end the stream after this many frames (counted across restarts)


class Stream:
    """A session fed by a FrameFeed, with checkpoints. Not thread-safe: one thread calls it (as the session)."""

    def __init__(self, session: Session, feed: FrameFeed, out: Output, params: StreamParams | None = None) -> None:
        self.session, self.feed, self.out = session, feed, out
        self.params = p = params or StreamParams()
        self.ended: str | None = None  # why the stream is over; the memory stays queryable
        self._lock = DirectoryLock(p.memory_dir) if p.memory_dir is not None else None
        self.checkpoints = CheckpointPolicy(p.memory_dir, p.checkpoint_every) if p.memory_dir is not None else None
        self._saved_key: tuple[int, int] | None = None  # (frames, answers) the last checkpoint holds
        self.watches: list[WatchPrompt] = []
        self.clock = 0.0  # stream time: the last frame's timestamp, or where a restart resumed
        self.last_frame: Frame | None = None  # for a page that shows what the camera sees
        for w in p.watches:
            self.watch(w)

    # -- lifetime ------------------------------------------------------------------------------------

    def start(self) -> RestoreReport | None:
        """Put back the memory saved in memory_dir, if there is one, then start reading frames."""
        report = None
        if self.checkpoints is not None:
            try:
                report = checkpoint.restore(self.session, self.checkpoints.directory)
            except BaseException:
                self._release()
                raise
            self.checkpoints.last_save = time.monotonic()
            if report is None:
                self.out.notice(f"no usable checkpoint in {self.checkpoints.directory}: starting with an empty "
                                "memory")
            else:
                self._restored(report)
        self.feed.start()
        return report

    def _restored(self, report: RestoreReport) -> None:
        self._saved_key = self._key()
        t = report.last_timestamp or 0.0
        if self.feed.live:  # the camera kept going while we were down: its clock too
            t += max(0.0, time.time() - report.saved_at)
        self.feed.resume_at(t)
        self.clock = t
        for w in self.watches:
            w.next_due = None
            self.watch(w, replace=True)
        ago = time.time() - report.saved_at
        self.out.notice(f"restored the memory of {report.path} (saved {_ago(ago)} ago): {report.frames_seen} "
                        f"frames seen, {report.frames_in_memory} in memory, {report.video_tokens} video tokens, "
                        f"{report.passes} passes; the stream goes on from {t:.1f} s")

    def close(self, reason: str = "closed") -> None:
        """End the stream if it is still running (for `reason`), write the last checkpoint, release the directory."""
        self.end(reason)
        self.save()
        self._release()

    def _release(self) -> None:
        self.feed.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- frames --------------------------------------------------------------------------------------

    def poll(self, timeout: float) -> bool:
        """Take what the feed has within `timeout` seconds (a frame, a notice or its end); False once the
        stream has ended."""
        if self.ended is not None:
            return False
        item = self.feed.get(timeout)
        if item is None:
            return True
        if isinstance(item, Notice):
            self.out.notice(item.message)
            return True
        if isinstance(item, FeedEnd):
            self.end(item.reason)
            return False
        try:
            self.session.insert_frame(item)
        except MemoryFull as e:
            self.end(str(e))
            return False
        self.last_frame, self.clock = item, item.timestamp
        self.out.status(self.session.status())
        self._ask_due(item.timestamp)
        if self.checkpoints is not None and self.checkpoints.due():
            self.save()
        if self.params.max_frames and self.session.frames_seen >= self.params.max_frames:
            self.end(f"reached --max-frames {self.params.max_frames}")
        return self.ended is None

    def end(self, reason: str) -> None:
        """Stop taking frames (the first reason is kept) and save; the memory stays queryable."""
        if self.ended is not None:
            return
        self.ended = reason
        self.feed.close()
        mem = self.session.memory
        self.out.notice(f"stream stopped ({reason}); {self.session.frames_seen} frames seen, "
                        f"{mem.video_tokens} video tokens kept in memory")
        self.save()

    # -- questions -----------------------------------------------------------------------------------

    def ask(self, question: str, on_token: Callable[[str], None] | None = None,
            history: list[tuple[str, str]] | None = None, max_tokens: int | None = None) -> Answer:
        """Answer from the memory. The pieces go to `out` (the CLI's terminal), or to on_token (an API client,
        with its own history); the answer event goes to `out` either way."""
        self.out.answer_start(question)
        answer = self.session.ask(question, on_token=on_token or self.out.token, history=history,
                                  max_tokens=max_tokens)
        self.out.answer_end(answer)
        return answer

    def watch(self, prompt: WatchPrompt, replace: bool = False) -> None:
        """Ask `prompt` from now on, first at the next multiple of its interval on the stream's clock."""
        if prompt.next_due is None:
            prompt.next_due = (math.floor(self.clock / prompt.every) + 1) * prompt.every
        if not replace:
            self.watches.append(prompt)

    def unwatch(self, prompt_id: str) -> bool:
        kept = [w for w in self.watches if w.id != prompt_id]
        found, self.watches = len(kept) < len(self.watches), kept
        return found

    def _ask_due(self, timestamp: float) -> None:
        for w in list(self.watches):
            if w.next_due is None or timestamp < w.next_due:
                continue
            answer = self.ask(w.prompt, history=[] if w.match else None)  # an alert's check has no conversation
            if w.fires(answer.text):
                self.out.alert(w.id, w.prompt, answer, timestamp)
            while w.next_due <= timestamp:
                w.next_due += w.every

    # -- checkpoints ---------------------------------------------------------------------------------

    def _key(self) -> tuple[int, int]:
        return self.session.frames_seen, len(self.session.history)

    def save(self) -> checkpoint.SaveReport | None:
        """Checkpoint the memory now if it changed since the last one. A failed save (a full disk) is a notice,
        never the end of the stream: the memory is still in RAM and the previous checkpoint on disk."""
        if self.checkpoints is None or self._key() == self._saved_key:
            return None
        self.checkpoints.last_save = time.monotonic()  # a failing disk is retried at the next interval
        try:
            report = checkpoint.save(self.session, self.checkpoints.directory)
        except (OSError, ModelError) as e:
            self.out.notice(f"checkpoint failed ({getattr(e, 'strerror', None) or e}); the memory is kept in RAM "
                            f"and {self.checkpoints.directory} still holds the previous checkpoint")
            return None
        self._saved_key = self._key()
        self.out.checkpoint(report)
        return report


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
