"""Frame sources: where the video comes from.

Every source yields `Frame`s already sampled to the rate the model can afford (``fps``, usually about one
frame a second), so the rest of the runtime never sees the native frame rate:

- live sources (`CameraSource`, `UrlSource`) drain the device on a background thread and hand out the
  freshest frame every 1/fps seconds of wall time, however slow the consumer is;
- recorded sources (`VideoFileSource`, `ImageFolderSource`, `SyntheticSource`) sample by media time and run
  as fast as possible, or, with ``realtime=True``, paced against the wall clock as if they were live
  (reproducible demos of the streaming behaviour); `FrameSource._paced` is that loop, written once.

`open_source` turns a CLI spec ("0", "rtsp://...", "clip.mp4", "frames/", "synthetic:3") into one of them.
Errors a user can fix (a wrong index, a dead URL, a corrupt file) are `SourceError`s with a one-line
message; a stream that dies mid-way just ends, with a warning logged.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import numpy as np

from edge_runtime import scenes
from edge_runtime.opencv import cv2

logger = logging.getLogger(__name__)

SOURCE_HELP = (
    "a camera index (0), an rtsp:// or http(s):// URL, an image folder, 'synthetic[:SEED]' or a video file"
)
URL_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "http://", "https://")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

# Media timestamps come in milliseconds and are rounded; a frame this close to a sampling point counts as
# on it (otherwise 0.9999 s would miss the 1 s sample and the next frame, 0.1 s later, would take it).
_EPS_S = 1e-3


class SourceError(Exception):
    """A frame source that cannot be opened or read; str() is one line that says what to do."""


@dataclass(frozen=True)
class Frame:
    index: int  # 0-based index among the frames this source yielded (after sampling)
    timestamp: float  # seconds: media time for files, wall time since start for live sources
    image: np.ndarray  # H x W x 3 uint8, BGR as OpenCV gives it


_S = TypeVar("_S", bound="FrameSource")


class FrameSource(ABC):
    """Yields sampled frames; iterating ends when the source ends."""

    description: str  # e.g. "camera 0", "video clip.mp4", "synthetic scene (seed 3, endless)"
    realtime: bool = False  # recorded sources: _paced waits for each frame's media time
    live: bool = False  # a camera or a network stream: it can drop and come back (edge_runtime.feed reopens it)
    end_reason: str | None = None  # why the last iteration ended, when the source knows (live sources)
    resumed_at: float | None = None  # resume_at's t

    def __init__(self, description: str) -> None:
        self.description = description
        # An Event rather than a bool so that paced waits (realtime, live sampling) wake up on close().
        self._closed = threading.Event()

    @abstractmethod
    def __iter__(self) -> Iterator[Frame]: ...

    def close(self) -> None:
        """Release the device or file; safe to call more than once."""
        self._closed.set()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"

    def resume_at(self, t: float) -> None:
        """Go on from stream time t, as after a restart: a recorded source skips its media up to t (without
        pacing it) and yields the frames after; a live one stamps its frames from t on. Applies to the
        iterations that follow."""
        self.resumed_at = t

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise SourceError(f"{self.description} is closed: open the source again to read from it")

    def _pace(self, deadline: float) -> bool:
        """Wait until time.monotonic() reaches deadline; False if the source was closed meanwhile."""
        return not self._closed.wait(max(0.0, deadline - time.monotonic()))

    def _paced(self, items: Iterable[tuple[float, Callable[[], np.ndarray | None]]]) -> Iterator[Frame]:
        """The recorded sources' loop: for each (media time t, producer), with realtime wait until t seconds
        after the start, stop if the source was closed, then yield the producer's image as the next Frame.

        A producer that returns None (an unreadable image, a video frame between two samples) yields no
        frame but is paced all the same, so the stream keeps the media's timing. Frame indices count the
        frames yielded.
        """
        skip_to = self.resumed_at
        wall_start = time.monotonic() - (skip_to or 0.0)  # resumed: pacing starts at the first frame after t
        index = 0
        for t, produce in items:
            if skip_to is not None and t <= skip_to + _EPS_S:
                continue  # seen before the restart: neither produced nor paced
            if self.realtime and not self._pace(wall_start + t):
                return
            if self._closed.is_set():
                return
            image = produce()
            if image is None:
                continue
            yield Frame(index, t, image)
            index += 1


def _check_fps(fps: float) -> None:
    if not fps > 0:  # also rejects NaN
        raise SourceError(f"fps must be a positive number of frames per second, got {fps}")


def _read(cap: cv2.VideoCapture, description: str) -> np.ndarray | None:
    """The next decoded frame, or None when there is none.

    Most backends report a decode failure as a False return, but some raise cv2.error instead; either
    way the stream is over for us.
    """
    try:
        ok, image = cap.read()
    except cv2.error as exc:
        logger.warning("%s: decoding failed: %s", description, str(exc).strip())
        return None
    return image if ok and image is not None else None


# --------------------------------------------------------------------------------------------------
# Live sources: a camera or a network stream.


class _LiveSource(FrameSource):
    """A capture that produces frames in real time whether or not anyone is reading them.

    If nobody grabs, the driver (or the network socket) queues frames and the next read returns one from
    seconds ago; with a VLM that takes seconds per frame that would be the normal case. So a background
    thread grabs continuously, and decodes (retrieve) only the first frame grabbed after the consumer asks
    for one: fresh frames, and no CPU spent converting the ones that are thrown away.
    """

    live = True

    def __init__(self, cap: cv2.VideoCapture, description: str, fps: float, stop_timeout_s: float) -> None:
        super().__init__(description)
        self.fps = fps
        self._cap = cap
        self._stop_timeout_s = stop_timeout_s
        self._t0 = time.monotonic()  # timestamps are wall time since the source was opened
        self._index = 0
        self._cond = threading.Condition()
        self._wanted = False  # the consumer waits for the next grabbed frame
        self._delivered: tuple[float, np.ndarray] | None = None
        self._ended = False
        self._thread = threading.Thread(target=self._drain, name=f"drain {description}", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        # OpenCV captures are not thread-safe: from here on only this thread touches self._cap, and it
        # releases it on the way out.
        reason = "it stopped delivering frames"
        try:
            while not self._closed.is_set():
                if not self._cap.grab():
                    break
                grabbed_at = time.monotonic() - self._t0
                with self._cond:
                    wanted = self._wanted
                if not wanted:
                    continue
                ok, image = self._cap.retrieve()
                if not ok or image is None:
                    reason = "a frame could not be decoded"
                    break
                with self._cond:
                    self._delivered = (grabbed_at, image)
                    self._wanted = False
                    self._cond.notify_all()
        except cv2.error as exc:
            reason = f"capture error: {str(exc).strip()}"
        finally:
            if not self._closed.is_set():
                self.end_reason = reason
                logger.info("%s ended: %s", self.description, reason)
            self._cap.release()
            with self._cond:
                self._ended = True
                self._cond.notify_all()

    def _take_frame(self) -> tuple[float, np.ndarray] | None:
        """The next frame the drain thread grabs, as (timestamp, image); None once the stream is over."""
        with self._cond:
            self._wanted = True
            self._cond.wait_for(lambda: self._delivered is not None or self._ended or self._closed.is_set())
            delivered, self._delivered = self._delivered, None
            return delivered

    def resume_at(self, t: float) -> None:
        super().resume_at(t)
        self._t0 = time.monotonic() - t  # the drain thread stamps frames against this clock

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        next_due = time.monotonic()
        while self._pace(next_due):
            taken = self._take_frame()
            if taken is None:
                return
            timestamp, image = taken
            index, self._index = self._index, self._index + 1
            yield Frame(index, timestamp, image)
            # A consumer slower than fps gets the freshest frame as soon as it asks again, never a burst
            # of frames that queued up while it was busy.
            next_due = max(next_due + 1.0 / self.fps, time.monotonic())

    def close(self) -> None:
        super().close()
        with self._cond:
            self._cond.notify_all()
        # Wait for the drain thread to release the device, so it can be reopened right after; it can be
        # stuck in a grab for up to the read time-out.
        self._thread.join(self._stop_timeout_s)
        if self._thread.is_alive():
            logger.warning("%s: capture still busy after close; it will be released when it returns", self)


class CameraSource(_LiveSource):
    """An OpenCV camera device (/dev/videoN on Linux), sampled at fps by wall clock."""

    def __init__(self, index: int, fps: float = 1.0) -> None:
        _check_fps(fps)
        cap = cv2.VideoCapture(index)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"camera {index} could not be opened: check the index (ls /dev/video*) "
                "and that no other program holds it"
            )
        # Some devices open but never deliver (held by another program, unsupported pixel format):
        # better to say so now than to end the stream silently on the first read.
        if _read(cap, f"camera {index}") is None:
            cap.release()
            raise SourceError(
                f"camera {index} opened but gave no frame: check that no other program holds it "
                "and that it streams a format OpenCV can read"
            )
        self.index = index
        # A camera grab returns within a frame interval, or within the driver's time-out (10 s in V4L2).
        super().__init__(cap, f"camera {index}", fps, stop_timeout_s=11.0)


def _redact(url: str) -> str:
    """The URL without its password, for logs and messages (IP camera URLs often carry one)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    userinfo, host = parts.netloc.rsplit("@", 1)
    user = userinfo.split(":", 1)[0]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class UrlSource(_LiveSource):
    """An RTSP/HTTP stream through OpenCV's FFmpeg backend; behaves like a live camera.

    FFmpeg's own defaults wait for a silent server forever, so the open and every read get a time-out
    (OpenCV implements them with an FFmpeg interrupt callback).
    """

    def __init__(self, url: str, fps: float = 1.0, timeout_s: float = 10.0) -> None:
        _check_fps(fps)
        if not timeout_s > 0:
            raise SourceError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        self.url = url
        shown = _redact(url)
        if not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
            raise SourceError(
                f"cannot open {shown}: this OpenCV build has no FFmpeg backend; "
                "install opencv-python-headless from PyPI"
            )
        timeout_ms = max(1, round(timeout_s * 1000))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        started = time.monotonic()
        cap = cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)
        if not cap.isOpened():
            cap.release()
            # A refused connection fails at once, a silent server only at the time-out: say which.
            if time.monotonic() - started >= 0.9 * timeout_s:
                raise SourceError(
                    f"{shown} did not answer within {timeout_s:g} s: "
                    "check that the stream is running and reachable from this machine"
                )
            raise SourceError(
                f"{shown} could not be opened: check the host, port, path and credentials "
                "(the connection was refused or it is not a video stream)"
            )
        if _read(cap, shown) is None:
            cap.release()
            raise SourceError(
                f"{shown} opened but sent no frame within {timeout_s:g} s: check the stream is live"
            )
        super().__init__(cap, f"stream {shown}", fps, stop_timeout_s=timeout_s + 1.0)


# --------------------------------------------------------------------------------------------------
# Recorded sources: a video file, a folder of images, a synthetic scene.


class VideoFileSource(FrameSource):
    """A video file sampled by media time: one frame per 1/fps seconds of video, the first at t=0.

    Each iteration starts again from the beginning of the file.
    """

    def __init__(self, path: str | Path, fps: float = 1.0, realtime: bool = False) -> None:
        _check_fps(fps)
        self.path = Path(path)
        super().__init__(f"video {self.path.name}")
        self.fps = fps
        self.realtime = realtime
        # The CLI closes a source from one thread while another iterates it; releasing a capture in the
        # middle of its read() would crash in native code, so reads and the release take turns.
        self._cap_lock = threading.Lock()
        self._cap: cv2.VideoCapture | None = None
        if not self.path.exists():
            raise SourceError(
                f"video file {self.path} does not exist: check the path (a source is {SOURCE_HELP})"
            )
        if self.path.is_dir():
            raise SourceError(f"{self.path} is a folder, not a video file: open it as an image folder")
        # Decode the first frame now, so that a bad file fails at open time rather than mid-run.
        cap = self._open()
        first = _read(cap, self.description)
        cap.release()
        if first is None:
            raise SourceError(
                f"video file {self.path} has no decodable frame: it is empty, truncated "
                "or in a codec this OpenCV build lacks"
            )

    def _open(self) -> cv2.VideoCapture:
        # CAP_ANY, not CAP_FFMPEG: OpenCV builds on some boards (Jetson) only have GStreamer.
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"video file {self.path} could not be opened: it is corrupt, truncated "
                "or not a video format this OpenCV build can read"
            )
        return cap

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        cap = self._open()
        with self._cap_lock:
            self._cap = cap  # so that close() releases it even while a consumer holds this generator
        try:
            yield from self._paced(self._decoded(cap))
        finally:
            with self._cap_lock:
                cap.release()

    def _decoded(self, cap: cv2.VideoCapture) -> Iterator[tuple[float, Callable[[], np.ndarray | None]]]:
        """Every decoded frame as (media time, producer): the producer gives the image at the sampling points,
        None between them. Realtime paces every decoded frame, not just the sampled ones, so the stream also
        ends when the media does, as a live one would."""
        native_fps = cap.get(cv2.CAP_PROP_FPS)
        # When the container gives no usable timestamps, frames are assumed one native frame apart; with
        # no native rate either, every frame is one sample.
        frame_step = 1.0 / native_fps if 0 < native_fps < 1000 else 1.0 / self.fps
        expected = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))  # an estimate for some containers, 0 if unknown
        first_pos: float | None = None
        t = 0.0
        next_due = 0.0
        decoded = 0
        while True:
            with self._cap_lock:
                # Checked under the lock: once close() has released the capture, it must not be read.
                if self._closed.is_set():
                    break
                image = _read(cap, self.description)
            if image is None:
                break
            decoded += 1
            # POS_MSEC (the media time of the frame just read) is the truth while it advances; some
            # backends report 0 or repeat it, and then we step by one native frame. Counting from the
            # first frame makes a stream that starts at a non-zero PTS still start at t=0.
            pos = cap.get(cv2.CAP_PROP_POS_MSEC) / 1000.0
            if first_pos is None:
                first_pos = pos
            elif pos - first_pos > t:
                t = pos - first_pos
            else:
                t += frame_step
            if t >= next_due - _EPS_S:
                # The next sampling point after this frame; a gap in the video skips the points it covers
                # instead of emitting the same frame several times.
                next_due = (math.floor((t + _EPS_S) * self.fps) + 1) / self.fps
                yield t, lambda image=image: image
            else:
                yield t, _not_sampled
        # OpenCV cannot tell the end of a file from a decode error, but a file that stops well short of
        # its announced frame count is truncated or damaged. The slack absorbs estimated counts.
        if not self._closed.is_set() and decoded < expected - max(1, expected // 20):
            logger.warning(
                "%s ended after %d of %d frames: the file is probably truncated or damaged",
                self.description,
                decoded,
                expected,
            )

    def close(self) -> None:
        super().close()
        with self._cap_lock:
            if self._cap is not None:
                self._cap.release()  # releasing twice is harmless in OpenCV
                self._cap = None


def _not_sampled() -> None:
    """The producer of a decoded video frame that is not sampled."""
    return None


def _natural_key(path: Path) -> list[str | int]:
    """Sort key that puts frame_2.png before frame_10.png."""
    # re.split with a capture group alternates text and digits, so keys compare str with str, int with int.
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


class ImageFolderSource(FrameSource):
    """The images in a folder, in natural name order, as consecutive frames at timestamps i / fps."""

    def __init__(self, directory: str | Path, fps: float = 1.0, realtime: bool = False) -> None:
        _check_fps(fps)
        self.directory = Path(directory)
        super().__init__(f"image folder {self.directory.name or self.directory}")
        self.fps = fps
        self.realtime = realtime
        if not self.directory.is_dir():
            raise SourceError(
                f"image folder {self.directory} does not exist: check the path (a source is {SOURCE_HELP})"
            )
        self.paths = sorted(
            (p for p in self.directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
            key=_natural_key,
        )
        if not self.paths:
            raise SourceError(
                f"image folder {self.directory} contains no images ({', '.join(IMAGE_EXTENSIONS)}): "
                "put frames there or give a video file"
            )

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        # The timestamp follows the file's position, so a skipped image leaves a gap in time, like a dropped
        # frame, rather than shifting every later frame earlier.
        yield from self._paced((position / self.fps, lambda path=path: self._load(path))
                               for position, path in enumerate(self.paths))

    def _load(self, path: Path) -> np.ndarray | None:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # grey or RGBA files come back as BGR
        if image is None:
            logger.warning("%s: skipping %s: not a readable image", self.description, path.name)
        return image


# --------------------------------------------------------------------------------------------------
# The synthetic world: edge_runtime.scenes.

SEGMENT_FRAMES = 120  # an endless synthetic stream is one scene of this many frames after another


class SyntheticSource(FrameSource):
    """The synthetic world of `edge_runtime.scenes`: a fixed camera, objects that come and go, questions
    with known answers; what edge-vlm was trained on. For demos and tests where no camera is at hand.

    With n_frames, the frames of ``scenes.make_stream(seed, n_frames)``, whose questions and events are
    `stream`. Without (None), endless: one SEGMENT_FRAMES-frame scene after another, scene k being
    ``make_stream(seed + k * 2**32, SEGMENT_FRAMES)`` (so scene 0 is the finite stream of that length; the
    camera cuts to a new scene between them), and `stream` is None. Frame i has media time i / fps.

    size: (width, height) in pixels. None gives the world's own 96 x 96 frames, byte for byte; any other
    size is those frames resized (cv2.INTER_LINEAR), for models and tests that want other shapes, e.g.
    4:3 ones. Everything is a function of (seed, i): the same seed gives identical frames.
    """

    def __init__(self, seed: int = 0, n_frames: int | None = None, fps: float = 1.0, realtime: bool = False,
                 size: tuple[int, int] | None = None) -> None:
        _check_fps(fps)
        if seed < 0:
            raise SourceError(f"synthetic seed must be a non-negative integer, got {seed}")
        if n_frames is not None and n_frames < 1:
            raise SourceError(f"a synthetic stream needs at least one frame, got n_frames={n_frames}")
        if size is not None and (size[0] < 16 or size[1] < 16):
            raise SourceError(f"synthetic frames must be at least 16 x 16 pixels, got {size[0]} x {size[1]}")
        length = f"{n_frames} frames" if n_frames is not None else "endless"
        super().__init__(f"synthetic scene (seed {seed}, {length})")
        self.seed = seed
        self.n_frames = n_frames
        self.fps = fps
        self.realtime = realtime
        self.size = size
        self.stream = scenes.make_stream(seed, n_frames) if n_frames is not None else None
        self._segment: tuple[int, scenes.Stream] | None = None  # the endless stream's current scene

    def frame(self, i: int) -> np.ndarray:
        """Frame i: H x W x 3 uint8, BGR."""
        if self.stream is not None:
            image = self.stream.frame(i)
        else:
            k, t = divmod(i, SEGMENT_FRAMES)
            if self._segment is None or self._segment[0] != k:
                self._segment = (k, scenes.make_stream(self.seed + k * 2**32, SEGMENT_FRAMES))
            image = self._segment[1].frame(t)
        if self.size is None or self.size == image.shape[1::-1]:
            return image
        return cv2.resize(image, self.size, interpolation=cv2.INTER_LINEAR)

    def __iter__(self) -> Iterator[Frame]:
        self._check_open()
        indices = itertools.count() if self.n_frames is None else range(self.n_frames)
        yield from self._paced((i / self.fps, lambda i=i: self.frame(i)) for i in indices)


# --------------------------------------------------------------------------------------------------


def open_source(spec: str, fps: float = 1.0, realtime: bool = False, timeout_s: float = 10.0) -> FrameSource:
    """The source a CLI spec names: a camera index, a URL, an image folder, 'synthetic[:SEED]' or a video.

    `realtime` applies to recorded sources (live ones always run in real time); `timeout_s` to URLs.
    """
    text = spec.strip()
    if not text:
        raise SourceError(f"no source given: give {SOURCE_HELP}")
    if text.isascii() and text.isdigit():
        return CameraSource(int(text), fps)
    if text.lower().startswith(URL_SCHEMES):
        return UrlSource(text, fps, timeout_s)
    if text == "synthetic" or text.startswith("synthetic:"):
        seed_text = text.partition(":")[2] or "0"
        if not (seed_text.isascii() and seed_text.isdigit()):
            raise SourceError(
                f"bad synthetic seed {seed_text!r}: use 'synthetic' or 'synthetic:SEED', SEED >= 0"
            )
        return SyntheticSource(seed=int(seed_text), fps=fps, realtime=realtime)
    path = Path(text).expanduser()
    if path.is_dir():
        return ImageFolderSource(path, fps, realtime)
    return VideoFileSource(path, fps, realtime)
