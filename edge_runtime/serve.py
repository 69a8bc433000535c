"""`edge-runtime serve`: several streams on one model, an HTTP API (edge_runtime.api), alerts, MQTT, a page.

    edge-runtime serve --stream door=rtsp://cam.local/live --stream yard:2048=0 --budget 4096 --memory-dir /var/lib/edge

The model is loaded once. Every stream has its own Session (its own llama.cpp context, budget and
compression: a pass on one never touches another's cells), its own Stream (a feed that reconnects, watch
prompts, checkpoints under DIR/<name>/) and its events on one bus (edge_runtime.events). One thread, the
Hub's, calls llama.cpp: it takes one frame from each stream in turn, so a busy camera cannot starve a quiet
one, and before each frame it runs one thing the API asked for (a question, mostly): a question waits for
the ones before it and one frame each, never for a backlog of frames, and a flood of questions slows the
streams down but cannot stop them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import logging
import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from edge_runtime.errors import ModelError, SettingsError
from edge_runtime.events import EventBus, StreamEvents
from edge_runtime.feed import FeedParams, FrameFeed
from edge_runtime.model import VisionLanguageModel
from edge_runtime.opencv import cv2
from edge_runtime.session import Answer
from edge_runtime.sources import FrameSource, open_source
from edge_runtime.stream import Stream, StreamParams, WatchPrompt

log = logging.getLogger(__name__)

T = TypeVar("T")
STREAM_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # it becomes a URL path part, an MQTT topic level, a folder
THUMBNAIL_SIDE = 160  # px, the longer side of the frames the page shows in its memory strip
# The newest frames in memory that keep a picture (about 5 KB each): a frame keeps its record while any layer
# and head holds one of its tokens, so the frames in memory grow for hours (700 of 700 after 700 frames at a
# budget of 1024, edge-vlm), and pictures of all of them grew the server by 40 MB an hour over 4 streams.
MAX_THUMBNAILS = 96


class UnknownStream(KeyError):
    def __str__(self) -> str:
        return f"no stream named {self.args[0]!r}: GET /v1/streams lists them"


class ClientGone(Exception):
    """Raised inside an answer whose client went away: the answer stops there, the cache is cleaned up."""


@dataclass(frozen=True)
class StreamSpec:
    name: str
    source: str
    budget: int | None = None  # None: the server's --budget

    @classmethod
    def parse(cls, text: str) -> StreamSpec:
        """NAME=SOURCE or NAME:BUDGET=SOURCE (--stream), SOURCE as the command's source flags take it."""
        head, sep, source = text.partition("=")
        name, _, budget = head.partition(":")
        if not sep or not source:
            raise SettingsError(f"--stream {text!r}: give NAME=SOURCE, e.g. door=rtsp://cam/live or desk=0")
        if budget and not budget.isdigit():
            raise SettingsError(f"--stream {text!r}: the budget after the name is a number of video tokens")
        return cls.checked(name, source, int(budget) if budget else None)

    @classmethod
    def checked(cls, name: str, source: str, budget: int | None = None) -> StreamSpec:
        if not STREAM_NAME.match(name):
            raise SettingsError(f"stream name {name!r}: use 1 to 64 letters, digits, '-' or '_'")
        if budget is not None and budget < 1:
            raise SettingsError(f"stream {name}: a budget is a positive number of video tokens, not {budget}")
        return cls(name, source.strip(), budget)


@dataclass
class Served:
    """A stream as the server holds it."""

    spec: StreamSpec
    stream: Stream
    events: StreamEvents
    description: str
    thumbnails: dict[int, bytes] = field(default_factory=dict)  # frame index -> JPEG, the newest frames in memory


class Hub:
    """The one thread that calls llama.cpp, for every stream. Thread-safe: other threads submit work."""

    def __init__(self, model: VisionLanguageModel, args: argparse.Namespace, bus: EventBus,
                 make_session: Callable[[int | None], object]) -> None:
        self.model, self.args, self.bus = model, args, bus
        self._make_session = make_session  # budget -> Session with the server's settings (cli.session_for)
        self.streams: dict[str, Served] = {}  # changed on the hub thread only; read anywhere
        self._jobs: queue.Queue[tuple[Callable[[], object], concurrent.futures.Future]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llama.cpp", daemon=True)
        self._alert_ids = itertools.count(1)

    # -- what other threads call ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run job() on the hub thread before its next frame; its result or exception comes in the future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._stopping.is_set() or not self._thread.is_alive():
            future.set_exception(ModelError("the server is shutting down"))
        else:
            self._jobs.put((job, future))
        return future

    def open_source(self, spec: StreamSpec) -> FrameSource:
        """Open a stream's source on the calling thread (a URL may take its time-out to answer)."""
        a = self.args
        return open_source(spec.source, fps=a.fps, realtime=a.realtime, timeout_s=a.timeout)

    def add(self, spec: StreamSpec, source: FrameSource) -> concurrent.futures.Future[Served]:
        return self.submit(lambda: self._add(spec, source))

    def remove(self, name: str) -> concurrent.futures.Future[None]:
        return self.submit(lambda: self._remove(name))

    def ask(self, name: str, question: str, history: list[tuple[str, str]] | None = None,
            on_token: Callable[[str], None] | None = None, gone: threading.Event | None = None,
            max_tokens: int | None = None) -> concurrent.futures.Future[Answer]:
        """Answer from one stream's memory; pieces go to on_token (on the hub thread: it must not block).
        Once `gone` is set the answer stops at its next piece (ClientGone). With history (an API client's
        conversation) the stream's own conversation is left alone."""
        def job() -> Answer:
            served = self.get(name)
            if gone is not None and gone.is_set():
                raise ClientGone

            def piece(text: str) -> None:
                if gone is not None and gone.is_set():
                    raise ClientGone
                if on_token is not None:
                    on_token(text)
            return served.stream.ask(question, on_token=piece, history=history or [], max_tokens=max_tokens)
        return self.submit(job)

    def add_alert(self, name: str, prompt: str, every: float, match: str | None, text: str
                  ) -> concurrent.futures.Future[WatchPrompt]:
        def job() -> WatchPrompt:
            watch = WatchPrompt(prompt, every, match, text, id=f"alert-{next(self._alert_ids)}")
            self.get(name).stream.watch(watch)
            return watch
        return self.submit(job)

    def remove_alert(self, alert_id: str) -> concurrent.futures.Future[bool]:
        return self.submit(lambda: any([s.stream.unwatch(alert_id) for s in list(self.streams.values())]))

    def memory_view(self, name: str) -> concurrent.futures.Future[list[dict]]:
        return self.submit(lambda: self._memory_view(self.get(name)))

    def get(self, name: str) -> Served:
        try:
            return self.streams[name]
        except KeyError:
            raise UnknownStream(name) from None

    def close(self, timeout: float = 120.0) -> None:
        """Close every stream (each writes its last checkpoint), then stop the thread."""
        if self._thread.is_alive():
            done = self.submit(self._close_all)
            try:
                done.result(timeout)
            except Exception as e:  # noqa: BLE001 - shutting down: say it and go on
                log.warning("closing the streams: %s", e)
        self._stopping.set()
        self._thread.join(5.0)

    # -- the hub thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            took = False
            for name in list(self.streams):
                # One job (a question, mostly) before each frame: a question waits for the ones before it and
                # one frame each, never for a backlog of frames; a flood of questions slows the streams
                # down but cannot stop them.
                self._run_jobs(limit=1)
                served = self.streams.get(name)
                if served is None or served.stream.ended is not None:
                    continue
                before = served.stream.session.frames_seen
                try:
                    served.stream.poll(timeout=0)
                except Exception as e:  # one stream's failure is that stream's end, never the server's
                    log.exception("stream %s failed", name)
                    served.stream.end(f"failed: {type(e).__name__}: {e}")
                if served.stream.session.frames_seen != before:
                    took = True
                    self._keep_thumbnail(served)
            if not took:  # no frame anywhere: the jobs may have the thread, waiting for the next one
                self._run_jobs()
                try:
                    job, future = self._jobs.get(timeout=0.02)
                except queue.Empty:
                    continue
                self._run_job(job, future)

    def _run_jobs(self, limit: int | None = None) -> None:
        done = 0
        while limit is None or done < limit:
            try:
                job, future = self._jobs.get_nowait()
            except queue.Empty:
                return
            self._run_job(job, future)
            done += 1

    @staticmethod
    def _run_job(job: Callable[[], object], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(job())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

    def _add(self, spec: StreamSpec, source: FrameSource) -> Served:
        if spec.name in self.streams:
            source.close()
            raise SettingsError(f"a stream named {spec.name!r} exists already: DELETE /v1/streams/{spec.name} first")
        a = self.args
        feed = FrameFeed(source, lambda: self.open_source(spec), FeedParams(reconnect=not a.no_reconnect))
        events = StreamEvents(self.bus, spec.name)
        try:
            session = self._make_session(spec.budget if spec.budget is not None else a.budget)
        except BaseException:
            feed.close()
            raise
        try:
            memory_dir = Path(a.memory_dir) / spec.name if a.memory_dir else None
            stream = Stream(session, feed, events, StreamParams(
                name=spec.name, memory_dir=memory_dir, checkpoint_every=a.checkpoint_every))
            stream.start()
        except BaseException:
            feed.close()
            session.close()
            raise
        served = Served(spec, stream, events, source.description)
        self.streams[spec.name] = served
        events.notice(f"stream {spec.name} added: {source.description}, budget "
                      f"{session.memory.budget} video tokens")
        return served

    def _remove(self, name: str) -> None:
        served = self.get(name)
        served.stream.close()
        served.stream.session.close()
        del self.streams[name]
        served.events.notice(f"stream {name} removed")

    def _close_all(self) -> None:
        for name in list(self.streams):
            try:
                self._remove(name)
            except Exception as e:  # noqa: BLE001 - the others still get their checkpoint
                log.warning("stream %s: %s", name, e)

    def _keep_thumbnail(self, served: Served) -> None:
        frame = served.stream.last_frame
        mem = served.stream.session.memory
        if frame is None or not mem.records:
            return
        h, w = frame.image.shape[:2]
        scale = THUMBNAIL_SIDE / max(h, w)
        small = cv2.resize(frame.image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])
        if ok:
            served.thumbnails[mem.records[-1].index] = jpeg.tobytes()
        live = {r.index for r in mem.records[-MAX_THUMBNAILS:]}
        for index in [i for i in served.thumbnails if i not in live]:
            del served.thumbnails[index]

    @staticmethod
    def _memory_view(served: Served) -> list[dict]:
        """Per frame still in memory: its time, the share of its tokens kept over all layers and heads, and
        that share per patch (rows of the patch grid): what the page draws as a heat map."""
        mem = served.stream.session.memory
        frame, patch, _ = mem.slots.arrays()
        n_heads = frame.shape[0] * frame.shape[1]
        view = []
        for r in mem.records:
            mask = frame == r.index
            counts = np.bincount(patch[mask], minlength=r.n_tokens)[:r.n_tokens] / n_heads
            grid = None
            if r.nx * r.ny and r.nx * r.ny <= r.n_tokens:
                first = (r.n_tokens - r.nx * r.ny) // 2  # wrapper tokens, when there are any, sit around the image
                grid = np.round(counts[first:first + r.nx * r.ny].reshape(r.ny, r.nx), 3).tolist()
            view.append({"frame": r.index, "timestamp": r.timestamp, "tokens": r.n_tokens,
                         "kept": round(float(counts.sum() / r.n_tokens), 4), "heat": grid,
                         "thumbnail": r.index in served.thumbnails})
        return view
