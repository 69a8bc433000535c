"""A stream's frames, handed to the thread that owns llama.cpp: the one owner of a source's lifetime.

`FrameFeed` reads its source on a thread of its own and holds at most a couple of frames for the consumer
(fresh frames, never a backlog). What it hands out is a `Frame`, a `Notice` (something a person should be
told) or, once, a `FeedEnd` with the reason the stream is over.

A live source (a camera, an RTSP/HTTP stream) that drops is not the end of the stream: the feed says so,
reopens it with backoff until it answers again or the feed is closed, and says when it is back; the video
memory, which lives on the consumer's side, is never touched. Its timestamps stay on one clock, the stream's
wall time, across drops and restarts (`FrameSource.resume_at`). A recorded source (a file, a folder, a
synthetic scene) ends at its end, as before; a restart resumes it after the last frame the memory holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.sources import Frame, FrameSource, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    kind: str  # "drop" or "back": the two events of a live source's connection
    message: str


@dataclass(frozen=True)
class FeedEnd:
    reason: str  # one line: "the source ended", "the source failed: ..."


@dataclass
class FeedParams:
    reconnect: bool = True  # reopen a live source that drops (recorded sources always end at their end)
    first_retry_s: float = 1.0  # a replugged USB camera is back within a second or two
    # Doubling up to this: a camera that is back waits at most this long to be seen again (Frigate retries every
    # 10 s too), and one attempt every 10 s costs a dead camera's network nothing.
    max_retry_s: float = 10.0
    held_frames: int = 2  # frames waiting for the consumer: enough to hide jitter, never a backlog


class FrameFeed:
    """Reads `source` on its own thread. `reopen` makes a new source like it (for a live one that drops);
    None never reopens. Call start() once, then get() from the consumer's thread; close() from any thread."""

    def __init__(self, source: FrameSource, reopen: Callable[[], FrameSource] | None = None,
                 params: FeedParams | None = None) -> None:
        self.params = params or FeedParams()
        self.description = source.description
        self._source = source
        self._reopen = reopen if self.params.reconnect and source.live else None
        self._items: queue.Queue[Frame | Notice | FeedEnd] = queue.Queue(maxsize=self.params.held_frames + 2)
        self._closed = threading.Event()
        self._lock = threading.Lock()  # guards _source against close() while the thread swaps it
        self._thread = threading.Thread(target=self._run, name=f"feed {source.description}", daemon=True)
        self._clock0 = time.monotonic()  # live timestamps: seconds on this clock (plus where a restart resumed)
        self._resumed_at = 0.0
        if source.live:
            source.resume_at(0.0)  # the source's clock is the feed's from now on
        self.drops = 0  # times the source dropped
        self.returns = 0  # times it came back

    @property
    def live(self) -> bool:
        """A camera or a network stream: its clock runs whether or not we watch."""
        return self._source.live

    def resume_at(self, t: float) -> None:
        """Before start(): the stream goes on from stream time t (a restored memory's last frame; for a live
        source, plus the time it was down)."""
        self._resumed_at = t
        self._clock0 = time.monotonic()
        self._source.resume_at(t)

    def start(self) -> None:
        self._thread.start()

    def get(self, timeout: float) -> Frame | Notice | FeedEnd | None:
        """The next item, or None if there is none within `timeout` seconds."""
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop reading and release the source (waits for a live source's device to be released)."""
        self._closed.set()
        with self._lock:
            source = self._source
        source.close()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=1.0)  # a reopen in progress may take its time-out; it closes what it opens

    # -- the feed thread -------------------------------------------------------------------------------

    def _put(self, item: Frame | Notice | FeedEnd) -> bool:
        """Queue an item for the consumer; False if the feed was closed while waiting for room."""
        while not self._closed.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _now(self) -> float:
        return self._resumed_at + time.monotonic() - self._clock0

    def _run(self) -> None:
        source = self._source
        while True:
            reason = self._read(source)
            source.close()
            if self._closed.is_set():
                return
            if self._reopen is None:
                self._put(FeedEnd(reason))
                return
            self.drops += 1
            dropped_at = time.monotonic()
            self._put(Notice("drop", f"{self.description} dropped ({reason}); the memory is kept, reconnecting "
                                     f"with backoff ({self.params.first_retry_s:g} s, doubling up to "
                                     f"{self.params.max_retry_s:g} s)"))
            source, attempts = self._reconnect()
            if source is None:  # closed while waiting
                return
            self.returns += 1
            self._put(Notice("back", f"{self.description} is back after {time.monotonic() - dropped_at:.1f} s "
                                     f"({attempts} attempt{'s' if attempts != 1 else ''})"))

    def _read(self, source: FrameSource) -> str:
        """Pass the source's frames on until it ends; the reason it ended, in one line."""
        try:
            for frame in source:
                if not self._put(frame):
                    return "stopped"
        except SourceError as e:
            return f"the source failed: {e}"
        except Exception as e:  # a dying camera driver must not take the memory with it
            return f"the source failed: {type(e).__name__}: {e}"
        return source.end_reason or "the source ended"

    def _reconnect(self) -> tuple[FrameSource | None, int]:
        """Reopen until it works or the feed is closed: (the new source, attempts) or (None, attempts)."""
        assert self._reopen is not None
        wait, attempts = self.params.first_retry_s, 0
        while not self._closed.wait(wait):
            attempts += 1
            try:
                source = self._reopen()
            except SourceError as e:
                log.info("%s: attempt %d failed: %s", self.description, attempts, e)
                wait = min(2 * wait, self.params.max_retry_s)
                continue
            source.resume_at(self._now())  # one clock for the whole stream
            with self._lock:
                self._source = source
            if self._closed.is_set():  # closed while it opened: close() saw the old source
                source.close()
                return None, attempts
            return source, attempts
        return None, attempts
