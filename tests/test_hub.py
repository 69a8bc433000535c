"""The Hub, the one thread that calls llama.cpp for every stream of `serve`: frames are taken one per stream in
turn, a question to one stream leaves every memory as it was, a failing stream ends alone. In process, on the
tiny real models (tests/test_serve.py drives the same through HTTP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from probes import probe_logits
from wallclock import wait_until

from edge_runtime.cli import build_serve_parser, session_for
from edge_runtime.events import EventBus
from edge_runtime.model import VisionLanguageModel
from edge_runtime.serve import MAX_THUMBNAILS, Hub, StreamSpec, UnknownStream
from edge_runtime.sources import SyntheticSource


def make_hub(model: VisionLanguageModel, fixtures: dict[str, Path], *extra: str) -> tuple[Hub, list[dict]]:
    args = build_serve_parser().parse_args(["--model", str(fixtures["model"]), "--mmproj", str(fixtures["mmproj"]),
                                            "--budget", "64", "--max-answer-tokens", "4", *extra])
    bus = EventBus()
    events: list[dict] = []
    bus.add_sink(events.append)
    hub = Hub(model, args, bus, lambda budget: session_for(model, args, budget))
    hub.start()
    return hub, events


def test_frames_are_taken_one_per_stream_in_turn(tiny_model: VisionLanguageModel, fixtures: dict[str, Path]) -> None:
    hub, events = make_hub(tiny_model, fixtures)
    try:
        for name, seed in (("a", 1), ("b", 2)):  # both as fast as the model goes: each could take every turn
            hub.add(StreamSpec(name, f"synthetic:{seed}"), SyntheticSource(seed=seed, n_frames=12)).result()
        wait_until(lambda: all(s.stream.ended for s in hub.streams.values()))
    finally:
        hub.close()
    order = [e["stream"] for e in events if e["event"] == "status"]
    assert sorted(order) == ["a"] * 12 + ["b"] * 12
    # From the second stream's first frame on, and while both still have frames, neither gets more than two
    # frames ahead of the other: counted from that moment, since "a" ran alone until "b" was added (a head
    # start that depends only on how fast this machine adds a stream).
    counts = {"a": 0, "b": 0}
    head_start = None
    for name in order:
        counts[name] += 1
        if counts["b"] and head_start is None:
            head_start = counts["a"]
        if head_start is not None and counts["a"] < 12:
            assert abs((counts["a"] - head_start) - (counts["b"] - 1)) <= 2, order


def test_a_question_to_one_stream_leaves_every_memory_as_it_was(tiny_model: VisionLanguageModel,
                                                                 fixtures: dict[str, Path]) -> None:
    hub, events = make_hub(tiny_model, fixtures)
    try:
        hub.add(StreamSpec("a", "synthetic:1"), SyntheticSource(seed=1, n_frames=9)).result()
        hub.add(StreamSpec("b", "synthetic:2", budget=128), SyntheticSource(seed=2, n_frames=9)).result()
        wait_until(lambda: all(s.stream.ended for s in hub.streams.values()))

        def memories() -> dict:
            return {n: (s.stream.session.context.state_bytes(),
                        probe_logits(s.stream.session.context, s.stream.session.memory.next_pos).tobytes(),
                        list(s.stream.session.history)) for n, s in hub.streams.items()}
        before = hub.submit(memories).result()
        pieces: list[str] = []
        answer = hub.ask("a", "What moved?", history=[("Anything?", "a square")], on_token=pieces.append).result()
        assert answer.frames == 9 and answer.n_tokens >= 1 and "".join(pieces).strip() == answer.text
        assert hub.submit(memories).result() == before  # both caches, both conversations
        assert {e["stream"] for e in events if e["event"] == "answer"} == {"a"}
        with pytest.raises(UnknownStream, match="no stream named 'c'"):
            hub.ask("c", "Hello?").result()
    finally:
        hub.close()


def test_a_client_that_goes_away_stops_its_answer(tiny_model: VisionLanguageModel, fixtures: dict[str, Path]) -> None:
    import threading

    from edge_runtime.serve import ClientGone

    hub, _ = make_hub(tiny_model, fixtures, "--max-answer-tokens", "64")
    try:
        hub.add(StreamSpec("a", "synthetic:1"), SyntheticSource(seed=1, n_frames=5)).result()
        wait_until(lambda: hub.streams["a"].stream.ended is not None)
        state = hub.submit(lambda: hub.streams["a"].stream.session.context.state_bytes()).result()
        gone = threading.Event()
        pieces: list[str] = []

        def on_token(piece: str) -> None:
            pieces.append(piece)
            gone.set()  # hung up after the first piece
        with pytest.raises(ClientGone):
            hub.ask("a", "Tell me everything.", on_token=on_token, gone=gone).result()
        assert len(pieces) == 1
        assert hub.submit(lambda: hub.streams["a"].stream.session.context.state_bytes()).result() == state
    finally:
        hub.close()


def test_the_event_bus_hands_events_to_a_subscriber_of_one_stream() -> None:
    bus = EventBus()

    async def listen() -> list[dict]:
        q = bus.subscribe("a")
        bus.publish({"event": "status", "stream": "b"})
        bus.publish({"event": "status", "stream": "a", "frames": 1})
        got = await asyncio.wait_for(q.get(), 5)
        bus.unsubscribe(q)
        return [got]
    assert [e["frames"] for e in asyncio.run(listen())] == [1]


def test_the_memory_strip_keeps_pictures_of_the_newest_frames_only(tiny_model: VisionLanguageModel,
                                                                     fixtures: dict[str, Path]) -> None:
    # frames stay in memory for hours (a token in any head keeps one), their pictures must not
    hub, _ = make_hub(tiny_model, fixtures, "--budget", "256")
    n = 2 * MAX_THUMBNAILS
    try:
        hub.add(StreamSpec("a", "synthetic:1"), SyntheticSource(seed=1, n_frames=n)).result()
        wait_until(lambda: hub.streams["a"].stream.ended)
        view = hub.memory_view("a").result()
    finally:
        hub.close()
    frames, pictured = [f["frame"] for f in view], [f["frame"] for f in view if f["thumbnail"]]
    assert len(frames) > MAX_THUMBNAILS  # more frames in memory than pictures
    assert pictured == frames[-MAX_THUMBNAILS:]
