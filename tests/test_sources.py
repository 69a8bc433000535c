"""Frame sources against real media: MP4/AVI files written with cv2.VideoWriter, image files, local
sockets standing in for dead or silent cameras, and a tiny MJPEG-over-HTTP server for a live stream.
No mocks: what passes here is what OpenCV/FFmpeg really does on this machine.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
import pytest

from edge_runtime.sources import (
    CameraSource,
    Frame,
    ImageFolderSource,
    SourceError,
    SyntheticSource,
    UrlSource,
    VideoFileSource,
    open_source,
)

CLIP_FPS = 10.0
CLIP_SIZE = (64, 48)  # width, height
GREY_STEP = 8  # frame k is grey k*8: 30 frames stay below 255 (k*10 would overflow past k=25)
GREY_TOLERANCE = 6  # mp4v and MJPEG shift flat grey by up to ~4 levels (limited-range YUV round trip)

T = TypeVar("T")


def write_clip(path: Path, n_frames: int, fourcc: str = "mp4v") -> Path:
    """A real video file whose frame k is uniformly grey k * GREY_STEP."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), CLIP_FPS, CLIP_SIZE)
    assert writer.isOpened(), f"this OpenCV cannot write {fourcc}"
    for k in range(n_frames):
        writer.write(np.full((CLIP_SIZE[1], CLIP_SIZE[0], 3), k * GREY_STEP, np.uint8))
    writer.release()
    return path


def grey(frame: Frame) -> float:
    return float(frame.image.mean())


def assert_grey(frame: Frame, level: int) -> None:
    assert abs(grey(frame) - level) <= GREY_TOLERANCE, (
        f"frame {frame.index}: grey {grey(frame)}, want {level}"
    )


def assert_one_line(error: pytest.ExceptionInfo[SourceError]) -> None:
    message = str(error.value)
    assert message and "\n" not in message


def bounded(fn: Callable[[], T], limit_s: float) -> T:
    """fn(), failing the test (instead of hanging the run) if it takes longer than limit_s."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed back to the test thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s: a hang"
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 s of video at 10 fps: frames 0..29."""
    return write_clip(tmp_path_factory.mktemp("clip") / "clip.mp4", 30)


# --- video files -----------------------------------------------------------------------------------


def test_video_sampled_at_1fps_gives_one_frame_per_media_second(clip: Path) -> None:
    with VideoFileSource(clip, fps=1.0) as source:
        frames = list(source)
    assert [f.index for f in frames] == [0, 1, 2]
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 1.0, 2.0])
    for frame, k in zip(frames, [0, 10, 20], strict=True):
        assert frame.image.shape == (CLIP_SIZE[1], CLIP_SIZE[0], 3) and frame.image.dtype == np.uint8
        assert_grey(frame, k * GREY_STEP)
    assert source.description == "video clip.mp4"


def test_video_sampled_at_2fps_gives_six_frames(clip: Path) -> None:
    frames = list(VideoFileSource(clip, fps=2.0))
    assert [f.timestamp for f in frames] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    for frame, k in zip(frames, [0, 5, 10, 15, 20, 25], strict=True):
        assert_grey(frame, k * GREY_STEP)


def test_video_sampled_above_native_rate_yields_each_frame_once(clip: Path) -> None:
    frames = list(VideoFileSource(clip, fps=25.0))
    assert len(frames) == 30
    assert [f.timestamp for f in frames] == pytest.approx([k / CLIP_FPS for k in range(30)])


def test_video_iterates_again_from_the_start(clip: Path) -> None:
    source = VideoFileSource(clip, fps=1.0)
    first = next(iter(source))
    again = list(source)
    assert first.timestamp == 0.0 and len(again) == 3 and again[0].timestamp == 0.0


def test_video_realtime_takes_about_the_media_duration(tmp_path: Path) -> None:
    short = write_clip(tmp_path / "short.mp4", 10)  # 1.0 s of media
    started = time.monotonic()
    fast = list(VideoFileSource(short, fps=10.0))
    fast_s = time.monotonic() - started
    started = time.monotonic()
    paced = bounded(lambda: list(VideoFileSource(short, fps=10.0, realtime=True)), 10.0)
    paced_s = time.monotonic() - started
    assert len(fast) == len(paced) == 10
    assert fast_s < 0.5
    assert 0.8 <= paced_s < 3.0


def test_truncated_mp4_is_an_error_or_a_shorter_stream(clip: Path, tmp_path: Path) -> None:
    # mp4v files from VideoWriter keep their index (moov atom) at the end: half a file has none.
    data = clip.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])

    def read_all() -> list[Frame] | None:
        try:
            return list(VideoFileSource(truncated, fps=10.0))
        except SourceError:
            return None

    frames = bounded(read_all, 10.0)
    assert frames is None or len(frames) < 30


def test_truncated_avi_yields_the_frames_before_the_cut_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # AVI keeps its header in front, so a cut file still opens and decodes up to the damage.
    data = write_clip(tmp_path / "full.avi", 30, fourcc="MJPG").read_bytes()
    truncated = tmp_path / "truncated.avi"
    truncated.write_bytes(data[: len(data) // 2])

    def read_all() -> list[Frame] | None:
        try:
            return list(VideoFileSource(truncated, fps=10.0))
        except SourceError:
            return None

    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources"):
        frames = bounded(read_all, 10.0)
    if frames is not None:  # this OpenCV build: a few frames, then a decode error
        assert 0 < len(frames) < 30
        for frame in frames:
            assert_grey(frame, round(frame.timestamp * CLIP_FPS) * GREY_STEP)
        assert "truncated" in caplog.text


def test_missing_video_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist") as error:
        VideoFileSource(tmp_path / "nope.mp4")
    assert_one_line(error)


def test_garbage_file_is_a_one_line_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(SourceError, match="garbage.mp4") as error:
        VideoFileSource(garbage)
    assert_one_line(error)


def test_video_without_frames_is_a_one_line_error(tmp_path: Path) -> None:
    empty = write_clip(tmp_path / "empty.mp4", 0)  # a real container with no frame in it
    with pytest.raises(SourceError) as error:
        VideoFileSource(empty)
    assert_one_line(error)


# --- image folders ---------------------------------------------------------------------------------


def test_image_folder_natural_order_timestamps_and_skipped_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Unpadded numbers: a plain sort would put frame_10 before frame_2.
    for k in range(1, 12):
        cv2.imwrite(str(tmp_path / f"frame_{k}.png"), np.full((20, 30, 3), k * 20, np.uint8))
    (tmp_path / "frame_5.png").write_bytes(b"not a png")  # damaged: skipped, leaves a gap in time
    cv2.imwrite(str(tmp_path / "frame_12.JPG"), np.full((20, 30), 240, np.uint8))  # grey, upper-case ext
    (tmp_path / "notes.txt").write_text("ignored")

    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources"):
        frames = list(ImageFolderSource(tmp_path, fps=2.0))

    assert [f.index for f in frames] == list(range(11))
    positions = [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]
    assert [f.timestamp for f in frames] == pytest.approx([(k - 1) / 2.0 for k in positions])
    for frame, k in zip(frames, positions, strict=True):
        assert frame.image.shape == (20, 30, 3) and frame.image.dtype == np.uint8
        assert abs(grey(frame) - k * 20) <= 3
    assert "frame_5.png" in caplog.text


def test_image_folder_empty_or_missing_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(SourceError, match="no images") as error:
        ImageFolderSource(tmp_path)
    assert_one_line(error)
    with pytest.raises(SourceError, match="does not exist") as error:
        ImageFolderSource(tmp_path / "missing")
    assert_one_line(error)


# --- synthetic scene -------------------------------------------------------------------------------


def test_synthetic_scene_is_deterministic_per_seed() -> None:
    a = list(SyntheticSource(seed=3, n_frames=5, size=(320, 240)))
    b = list(SyntheticSource(seed=3, n_frames=5, size=(320, 240)))
    c = list(SyntheticSource(seed=4, n_frames=5, size=(320, 240)))
    assert len(a) == 5
    assert [f.timestamp for f in a] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(np.array_equal(x.image, y.image) for x, y in zip(a, b, strict=True))
    assert not any(np.array_equal(x.image, z.image) for x, z in zip(a, c, strict=True))
    assert a[0].image.shape == (240, 320, 3) and a[0].image.dtype == np.uint8


def test_synthetic_scene_changes_more_than_its_noise() -> None:
    scene = SyntheticSource(seed=1, n_frames=120, fps=5.0, size=(160, 120))
    frames = list(scene)
    comings_and_goings = 0
    for t, (before, after) in enumerate(itertools.pairwise(frames)):
        changed = np.abs(before.image.astype(int) - after.image.astype(int)).max(axis=2) > 40
        shown = scene.stream.event_at(t), scene.stream.event_at(t + 1)
        if shown[0] is not shown[1]:  # an object comes or goes
            assert changed.mean() > 0.005
            comings_and_goings += 1
        elif shown == (None, None):  # noise (within +-7) and the background's drift never move a pixel by 40
            assert not changed.any()
    assert comings_and_goings >= 4
    assert np.array_equal(scene.frame(7), scene.frame(7))


def test_synthetic_scene_is_endless_without_n_frames() -> None:
    frames = list(itertools.islice(SyntheticSource(fps=30.0, size=(32, 24)), 200))
    assert [f.index for f in frames] == list(range(200))


def test_synthetic_realtime_is_paced() -> None:
    started = time.monotonic()
    frames = list(SyntheticSource(fps=10.0, size=(32, 24), n_frames=6, realtime=True))
    elapsed = time.monotonic() - started
    assert len(frames) == 6 and 0.8 * 0.5 <= elapsed < 2.0  # last frame is due at t = 0.5 s


# --- cameras and URLs ------------------------------------------------------------------------------


def test_missing_camera_fails_fast_with_a_one_line_error() -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="camera 99 could not be opened") as error:
        bounded(lambda: CameraSource(99), 10.0)
    assert time.monotonic() - started < 5.0
    assert_one_line(error)


@pytest.fixture
def closed_port() -> int:
    """A local port nobody listens on: bind, read the number, close."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port that accepts connections and never says a word, like a wedged camera."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:  # server closed at teardown
                return

    threading.Thread(target=accept_forever, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for conn in held:
        conn.close()


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_url_to_closed_port_fails_fast(scheme: str, closed_port: int) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="could not be opened") as error:
        bounded(lambda: UrlSource(f"{scheme}://127.0.0.1:{closed_port}/x.mp4", timeout_s=2.0), 15.0)
    assert time.monotonic() - started < 10.0
    assert_one_line(error)


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_url_to_silent_server_times_out(scheme: str, silent_server: int) -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match="did not answer within 2 s") as error:
        bounded(lambda: UrlSource(f"{scheme}://127.0.0.1:{silent_server}/stream", timeout_s=2.0), 15.0)
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 10.0  # it really waited for the server, and then gave up
    assert_one_line(error)


def test_url_error_does_not_show_the_password(closed_port: int) -> None:
    with pytest.raises(SourceError) as error:
        UrlSource(f"rtsp://admin:hunter2@127.0.0.1:{closed_port}/live", timeout_s=2.0)
    assert "hunter2" not in str(error.value) and "admin:***@" in str(error.value)


@pytest.fixture
def mjpeg_server() -> Iterator[int]:
    """An IP-camera style MJPEG stream over HTTP: 30 JPEGs at 20 fps (grey k*8), then silence."""
    server = socket.create_server(("127.0.0.1", 0))
    done = threading.Event()

    def stream(conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)  # the request; any path will do
            conn.sendall(
                b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=frame\r\n\r\n"
            )
            for k in range(30):
                _, jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), k * GREY_STEP, np.uint8))
                header = b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % jpeg.size
                try:
                    conn.sendall(header + jpeg.tobytes() + b"\r\n")
                except OSError:  # the client gave up
                    return
                time.sleep(0.05)
            done.wait(30)  # stall with the connection open: only the read time-out can end this

    def accept_forever() -> None:
        while True:
            try:
                conn = server.accept()[0]
            except OSError:
                return
            threading.Thread(target=stream, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_forever, daemon=True).start()
    yield server.getsockname()[1]
    done.set()
    server.close()


def test_url_live_stream_samples_fresh_frames_and_ends_on_stall(
    mjpeg_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources"):
        with open_source(f"http://127.0.0.1:{mjpeg_server}/video.mjpg", fps=4.0, timeout_s=1.0) as source:
            assert isinstance(source, UrlSource)
            frames = bounded(lambda: list(source), 10.0)
    elapsed = time.monotonic() - started
    # About 1.5 s of stream at 4 fps; the stall then ends the iteration after the 1 s read time-out.
    assert 3 <= len(frames) <= 8, [f.timestamp for f in frames]
    assert [f.index for f in frames] == list(range(len(frames)))
    gaps = np.diff([f.timestamp for f in frames])
    assert (gaps > 0.15).all(), gaps  # sampled at ~0.25 s, not every frame of the 20 fps stream
    levels = [grey(f) for f in frames]
    assert all(b - a >= 2 * GREY_STEP for a, b in itertools.pairwise(levels)), levels  # fresh, not buffered
    assert source.end_reason == "it stopped delivering frames"  # said by the feed as a notice
    assert elapsed < 10.0


def test_url_live_stream_closed_from_another_thread_ends_quietly(
    mjpeg_server: int, caplog: pytest.LogCaptureFixture
) -> None:
    # The CLI iterates on a reader thread and closes from the main one.
    source = UrlSource(f"http://127.0.0.1:{mjpeg_server}/video.mjpg", fps=10.0, timeout_s=2.0)
    frames: list[Frame] = []
    reader = threading.Thread(target=lambda: frames.extend(source), daemon=True)
    with caplog.at_level(logging.WARNING, logger="edge_runtime.sources"):
        reader.start()
        time.sleep(0.3)
        started = time.monotonic()
        source.close()
        reader.join(3.0)
    assert not reader.is_alive() and time.monotonic() - started < 3.0
    assert frames and source.end_reason is None and "ended" not in caplog.text  # a deliberate close is no failure


def test_video_closed_from_another_thread_stops_reading(clip: Path) -> None:
    source = VideoFileSource(clip, fps=10.0, realtime=True)  # 3 s if left alone
    frames: list[Frame] = []
    reader = threading.Thread(target=lambda: frames.extend(source), daemon=True)
    reader.start()
    time.sleep(0.3)
    started = time.monotonic()
    source.close()
    reader.join(3.0)
    assert not reader.is_alive() and time.monotonic() - started < 1.0
    assert 0 < len(frames) < 30


# --- open_source and the FrameSource contract ------------------------------------------------------


def test_open_source_picks_the_source_from_the_spec(clip: Path, tmp_path: Path, closed_port: int) -> None:
    assert isinstance(open_source(str(clip)), VideoFileSource)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    assert isinstance(open_source(str(tmp_path)), ImageFolderSource)
    scene = open_source("synthetic:7", fps=2.0)
    assert isinstance(scene, SyntheticSource) and scene.seed == 7 and scene.fps == 2.0
    assert isinstance(open_source("synthetic"), SyntheticSource)
    with pytest.raises(SourceError, match="camera 99"):
        open_source("99")
    with pytest.raises(SourceError, match=f"127.0.0.1:{closed_port}"):
        open_source(f"rtsp://127.0.0.1:{closed_port}/live", timeout_s=2.0)
    with pytest.raises(SourceError, match="synthetic seed"):
        open_source("synthetic:abc")
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nothing.mp4"))
    with pytest.raises(SourceError, match="no source"):
        open_source("  ")


def test_close_is_idempotent_and_a_closed_source_refuses_to_iterate(clip: Path) -> None:
    with VideoFileSource(clip) as source:
        next(iter(source))
    source.close()
    with pytest.raises(SourceError, match="closed"):
        list(source)
    with SyntheticSource(n_frames=3) as scene:
        frames = iter(scene)
        next(frames)
        scene.close()
        assert list(frames) == []  # closing mid-iteration ends the stream


def test_non_positive_fps_is_a_one_line_error(clip: Path) -> None:
    with pytest.raises(SourceError, match="fps") as error:
        VideoFileSource(clip, fps=0)
    assert_one_line(error)
