"""The feed: a live source that drops is reopened with backoff and said so, on one clock; a recorded one ends
at its end, and resumes after a given time. Against a real MJPEG-over-HTTP camera on loopback that the tests
stop and start again (scripts/mjpeg_server.py), read through OpenCV's FFmpeg backend."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from wallclock import wall_s

from edge_runtime.feed import FeedEnd, FeedParams, FrameFeed, Notice
from edge_runtime.sources import Frame, SyntheticSource, open_source
from scripts.mjpeg_server import MjpegServer, synthetic_camera

FAST_RETRY = FeedParams(first_retry_s=0.2, max_retry_s=0.4)


@pytest.fixture
def camera() -> Iterator[MjpegServer]:
    with synthetic_camera(seed=1, fps=10.0) as server:
        yield server


def url_feed(server: MjpegServer, params: FeedParams = FAST_RETRY) -> FrameFeed:
    def reopen():
        return open_source(server.url, fps=5.0, timeout_s=1.0)
    return FrameFeed(reopen(), reopen, params)


def take(feed: FrameFeed, until, limit_s: float = 20.0) -> list:
    """Items from the feed up to and including the first for which until(item) holds."""
    items, deadline = [], time.monotonic() + wall_s(limit_s)
    while time.monotonic() < deadline:
        item = feed.get(timeout=0.1)
        if item is None:
            continue
        items.append(item)
        if until(item):
            return items
    raise AssertionError(f"the feed did not get there in {limit_s} s: {items}")


def frames_in(items: list) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


def test_a_camera_that_drops_is_reopened_and_its_clock_goes_on(camera: MjpegServer) -> None:
    feed = url_feed(camera)
    feed.start()
    try:
        before = frames_in(take(feed, lambda i: isinstance(i, Frame) and i.index >= 3))
        camera.stop()
        dropped = take(feed, lambda i: isinstance(i, Notice))
        assert dropped[-1].kind == "drop" and "reconnecting" in dropped[-1].message
        time.sleep(1.5)  # down for a while: several attempts fail (connection refused)
        camera.start()
        back = take(feed, lambda i: isinstance(i, Notice))
        assert back[-1].kind == "back" and "is back after" in back[-1].message
        assert not frames_in(back)  # nothing while it was down
        after = frames_in(take(feed, lambda i: isinstance(i, Frame) and i.index >= 2))  # the new source counts anew
        assert not [i for i in after if isinstance(i, FeedEnd)]
        stamps = [f.timestamp for f in frames_in(before + dropped) + after]
        assert all(b > a for a, b in zip(stamps, stamps[1:], strict=False)), stamps  # one clock, never back
        assert after[0].timestamp - before[-1].timestamp >= 1.5  # the time it was down is on the clock
        assert (feed.drops, feed.returns) == (1, 1) and camera.connections >= 2
    finally:
        feed.close()


def test_without_reconnect_a_drop_ends_the_feed(camera: MjpegServer) -> None:
    feed = url_feed(camera, FeedParams(reconnect=False))
    feed.start()
    try:
        take(feed, lambda i: isinstance(i, Frame))
        camera.stop()
        end = take(feed, lambda i: isinstance(i, FeedEnd))[-1]
        assert "stopped delivering frames" in end.reason
    finally:
        feed.close()


def test_close_while_reconnecting_returns_at_once(camera: MjpegServer) -> None:
    feed = url_feed(camera, FeedParams(first_retry_s=30.0))
    feed.start()
    take(feed, lambda i: isinstance(i, Frame))
    camera.stop()
    take(feed, lambda i: isinstance(i, Notice))
    started = time.monotonic()
    feed.close()
    assert time.monotonic() - started < 2.0


def test_a_recorded_source_ends_at_its_end_and_resumes_after_a_time() -> None:
    feed = FrameFeed(SyntheticSource(seed=4, n_frames=10), reopen=lambda: SyntheticSource(seed=4, n_frames=10))
    feed.resume_at(6.0)  # frames 0..6 were seen before a restart
    feed.start()
    items = take(feed, lambda i: isinstance(i, FeedEnd))
    feed.close()
    frames = frames_in(items)
    assert [f.timestamp for f in frames] == [7.0, 8.0, 9.0]
    whole = list(SyntheticSource(seed=4, n_frames=10))
    assert all((f.image == whole[int(f.timestamp)].image).all() for f in frames)
    assert items[-1].reason == "the source ended" and feed.drops == 0


def test_a_resumed_realtime_source_does_not_wait_for_the_frames_it_skips() -> None:
    source = SyntheticSource(seed=4, n_frames=200, fps=10.0, realtime=True)
    source.resume_at(19.0)  # 190 frames = 19 s of media skipped
    started = time.monotonic()
    frames = [f for _, f in zip(range(3), source, strict=False)]
    assert time.monotonic() - started < 2.0
    assert [round(f.timestamp, 1) for f in frames] == [19.1, 19.2, 19.3]
