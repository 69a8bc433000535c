"""The synthetic question task: deterministic streams, answers that agree with what was drawn, no OpenCV."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest

from edge_runtime.scenes import (
    COLOURS,
    QUESTION_KINDS,
    SHAPES,
    Stream,
    digit_mask,
    grade,
    make_stream,
    normalise,
)
from edge_runtime.sources import SyntheticSource

SEEDS = range(40)


def test_same_seed_same_bytes_any_order() -> None:
    a, b = make_stream(7, 50), make_stream(7, 50)
    assert a.frames().tobytes() == b.frames().tobytes()
    assert a.events == b.events and a.questions() == b.questions()
    # A frame does not depend on the frames rendered before it.
    assert np.array_equal(make_stream(7, 50).frame(31), a.frames(30, 32)[1])


def test_different_seeds_differ() -> None:
    a, b = make_stream(1, 20), make_stream(2, 20)
    assert not np.array_equal(a.frame(0), b.frame(0))
    assert a.events != b.events


def test_frames_shape_and_noise() -> None:
    stream = make_stream(3, 40, size=64)
    clip = stream.frames(0, 40)
    assert clip.shape == (40, 64, 64, 3) and clip.dtype == np.uint8
    empty = [t for t in range(39) if stream.event_at(t) is None and stream.event_at(t + 1) is None
             and t // stream._drift[0] == (t + 1) // stream._drift[0]
             and t // stream._drift[1] == (t + 1) // stream._drift[1]]
    assert empty, "this seed should have two empty frames in a row with no drift between them"
    t = empty[0]
    diff = clip[t + 1].astype(float) - clip[t].astype(float)
    # Two independent noise draws of sigma ~3.2 differ by sigma ~4.6; the static scene adds nothing.
    assert 3.5 < diff.std() < 5.5 and abs(diff.mean()) < 0.5
    with pytest.raises(IndexError):
        stream.frame(40)


def test_background_drifts_slowly() -> None:
    stream = make_stream(5, 400, n_events=(0, 0))
    # Far apart, the drift shows as a shift; compared over two frames it is at most a pixel.
    a, b = stream.frame(0).astype(float), stream.frame(399).astype(float)
    assert np.abs(a - b).mean() > 3
    steps = [t for t in range(399) if (t + 1) // stream._drift[0] != t // stream._drift[0]]
    assert 399 / 25 <= len(steps) <= 399 / 15


def test_events_do_not_overlap_and_stay_in_frame() -> None:
    for seed in SEEDS:
        for n_frames in (4, 30, 600, 3600):
            stream = make_stream(seed, n_frames)
            assert 1 <= len(stream.events) <= 6
            for e, nxt in zip(stream.events, stream.events[1:], strict=False):
                assert e.end < nxt.start, "events are apart by at least one empty frame"
            for e, sprite in zip(stream.events, stream._sprites, strict=True):
                assert 0 <= e.start < e.end <= n_frames and e.obj.kind in SHAPES and e.obj.colour in COLOURS
                assert 28 <= e.size <= 40 and (e.obj.digit is not None) == (e.obj.kind == "card")
                assert e.end - e.start <= 8
                length = e.end - 1 - e.start
                moved = np.hypot(e.end_pos[0] - e.start_pos[0], e.end_pos[1] - e.start_pos[1])
                assert moved <= 2.0 * length + 1e-9
                h, w = sprite.mask.shape
                for t in (e.start, e.end - 1):  # the whole object in view: a visible object is seen whole
                    x, y = e.position(t)
                    assert 0 <= x - w // 2 <= stream.size - w and 0 <= y - h // 2 <= stream.size - h


def test_objects_are_drawn_where_the_events_say() -> None:
    stream = make_stream(11, 200, n_events=(4, 4))
    for e in stream.events:
        t = (e.start + e.end) // 2
        x, y = e.position(t)
        centre = stream.frame(t)[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).astype(float)
        if e.obj.kind == "card":  # the centre may be ink: look at the card's top edge instead
            top = y - e.size // 2 + 1
            centre = stream.frame(t)[top:top + 2, x - 2:x + 3].reshape(-1, 3).astype(float)
        assert np.abs(centre.mean(0) - COLOURS[e.obj.colour]).max() < 8
        assert stream.event_at(t) == e
        assert stream.event_at(e.end) is None or stream.event_at(e.end) != e


def test_digits_are_distinct_and_large() -> None:
    masks = [digit_mask(d) for d in range(10)]
    assert masks[0].shape == (22, 16)
    assert len({m.tobytes() for m in masks}) == 10


def test_start_times_cover_the_stream() -> None:
    starts = np.array([e.start / 3600 for seed in range(200) for e in make_stream(seed, 3600).events])
    counts, _ = np.histogram(starts, bins=5, range=(0, 1))
    assert counts.min() > 0.6 * counts.mean()
    assert any(make_stream(seed, 3600).events[-1].end == 3600 for seed in range(20)), "some last events stay"


def _truth(stream: Stream, n: int) -> dict[str, object]:
    """What the questions should say, recomputed from the frames' events frame by frame (the slow way)."""
    shown = [stream.event_at(t) for t in range(n)]
    appearances = [e for t, e in enumerate(shown) if e is not None and (t == 0 or shown[t - 1] is not e)]
    return {"appearances": appearances, "now": shown[-1]}


@pytest.mark.parametrize("n_frames", [4, 12, 90])
def test_answers_agree_with_the_events(n_frames: int) -> None:
    for seed in SEEDS:
        stream = make_stream(seed, n_frames)
        for until in (None, max(1, n_frames // 2)):
            n = n_frames if until is None else until
            truth = _truth(stream, n)
            apps = truth["appearances"]
            questions = stream.questions(until)
            assert len({q.text for q in questions}) == len(questions), "one answer per question"
            for q in questions:
                assert q.kind in QUESTION_KINDS and q.depth == n - 1 - q.evidence_frame and 0 <= q.depth < n
                shown = stream.event_at(q.evidence_frame)
                if q.kind == "colour":
                    kind = q.text.removeprefix("What colour was the ").removesuffix("?")
                    assert {e.obj.colour for e in apps if e.obj.kind == kind} == {q.answer}
                    assert shown is not None and shown.obj.kind == kind
                elif q.kind == "shape":
                    colour = q.text.split()[4]
                    assert {e.obj.kind for e in apps if e.obj.colour == colour} == {q.answer}
                    assert shown is not None and shown.obj.colour == colour
                elif q.kind == "digit":
                    colour = q.text.split()[5]
                    assert {str(e.obj.digit) for e in apps if e.obj.name == f"{colour} card"} == {q.answer}
                    assert shown is not None and str(shown.obj.digit) == q.answer
                elif q.kind == "first":
                    assert q.answer == apps[0].obj.name and shown is apps[0]
                elif q.kind == "last":
                    assert q.answer == apps[-1].obj.name and shown is apps[-1]
                elif q.kind == "count":
                    name = q.text.removeprefix("How many times did a ").removesuffix(" appear?")
                    times = [e for e in apps if e.obj.name == name]
                    assert q.answer == str(len(times))
                    assert q.evidence_frame == (min(times[0].end, n) - 1 if times else 0)
                elif q.kind == "now":
                    now = truth["now"]
                    assert q.answer == ("nothing" if now is None else now.obj.name) and q.depth == 0
                # Evidence is the latest frame that shows the answer: nothing later shows it again.
                if q.kind in ("colour", "shape", "digit", "last"):
                    assert all(stream.event_at(t) is not shown for t in range(q.evidence_frame + 1, n))


def test_every_kind_of_question_and_answer_appears() -> None:
    kinds: Counter[str] = Counter()
    answers: dict[str, set[str]] = {}
    for seed in SEEDS:
        for q in make_stream(seed, 300).questions():
            kinds[q.kind] += 1
            answers.setdefault(q.kind, set()).add(q.answer)
    assert set(kinds) == set(QUESTION_KINDS)
    assert answers["shape"] == set(SHAPES) and answers["colour"] == set(COLOURS)
    assert {"0", "1", "2"} <= answers["count"] and "nothing" in answers["now"] and len(answers["now"]) > 3
    assert len(answers["digit"]) >= 5


def test_ask_set_is_balanced_and_deterministic() -> None:
    stream = make_stream(4, 600, n_events=(6, 6))
    available = Counter(q.kind for q in stream.questions())
    assert available["count"] > 2, "this seed has several count questions, so balance is tested"
    picked = stream.ask_set(0, len(available))
    assert picked == stream.ask_set(0, len(available)) and picked != stream.ask_set(1, len(available))
    assert Counter(q.kind for q in picked) == dict.fromkeys(available, 1), "one of each kind before any twice"
    assert len(stream.ask_set(np.random.default_rng(3), 1000)) == len(stream.questions())


def test_grade() -> None:
    assert grade("Red circle.", "red circle")
    assert grade("  red   circle \nbecause it was round", "red circle")
    assert grade('"7"', "7") and grade("7.", "7") and grade("nothing!", "nothing")
    assert not grade("It was a red circle", "red circle")
    assert not grade("red", "red circle") and not grade("", "0") and not grade("17", "7")
    assert normalise("\n\nBlue Card\n") == "blue card"


def test_long_stream_builds_at_once() -> None:
    t0 = time.perf_counter()
    stream = make_stream(0, 3600)
    questions = stream.questions()
    assert time.perf_counter() - t0 < 0.5, "nothing per frame is computed up front"
    assert questions and stream.frame(3599).shape == (96, 96, 3)


def test_short_clips_still_hold_an_event() -> None:
    for seed in SEEDS:
        stream = make_stream(seed, 4)
        assert len(stream.events) == 1 and stream.events[0].end - stream.events[0].start >= 3
    assert make_stream(0, 1, duration=(3, 8)).events[0].end == 1
    assert make_stream(0, 50, n_events=(0, 0)).questions()[-1].answer == "nothing"


def test_scene_source_yields_the_stream() -> None:
    stream = make_stream(2, 6)
    source = SyntheticSource(seed=2, n_frames=6, fps=2.0)
    frames = list(source)
    assert [f.index for f in frames] == list(range(6)) and frames[-1].timestamp == 2.5
    assert np.array_equal(frames[3].image, stream.frame(3))
    assert source.stream.questions() == stream.questions()


def test_import_needs_neither_opencv_nor_llama_cpp() -> None:
    code = ("import sys, edge_runtime.scenes as s; s.make_stream(0, 10).frames(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cv2', 'llama_cpp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
