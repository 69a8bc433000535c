"""Synthetic video streams whose questions have checkable answers: the task the vision encoder learns.

A stream is a fixed camera looking at a quiet background (low-saturation colours, smooth texture, a
slow drift of a pixel every ~20 frames, fresh camera noise each frame). Now and then one object comes
into view, stays still or moves slowly, and leaves: a circle, square, triangle or card (a rectangle with
a large digit) in one of six saturated colours. **At most one object is visible at a time**, so every
question about what was seen has one answer, and `Stream.questions` lists them all with that answer and
the frame that holds the evidence.

Everything is a function of the seed and the frame index: the same seed gives the same bytes on every
machine. Rendering is a crop of a precomputed canvas, one precomputed sprite pasted, and noise from a
counter-based generator, so a frame costs a few tens of microseconds and a 3600-frame stream costs
nothing until its frames are asked for.

NumPy only, by design: the trainer imports this module on a GPU machine without OpenCV or llama.cpp.
Frames are H x W x 3 uint8 BGR, the runtime's convention (it converts to RGB for the projector).

    stream = make_stream(seed=3, n_frames=600)
    clip = stream.frames(0, 600)                  # [600, 96, 96, 3] uint8, BGR
    for q in stream.ask_set(seed=0, n=8):
        print(q.text, "->", q.answer, "from", q.depth, "frames back")
    grade("Red circle.", "red circle")            # True
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# --------------------------------------------------------------------------------------------------
# Vocabulary: the names below are the answers, so they are part of the training data; keep them stable.

SHAPES = ("circle", "square", "triangle", "card")

# BGR. Saturated and far apart in hue, so a small encoder can tell them apart and from the background,
# whose channels stay within ~30 of each other.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (36, 36, 220),
    "green": (40, 185, 40),
    "blue": (225, 80, 30),
    "yellow": (30, 225, 240),
    "purple": (190, 40, 150),
    "white": (245, 245, 245),
}
_INK_BLACK = (20, 20, 20)
_INK_WHITE = (250, 250, 250)

QUESTION_KINDS = ("colour", "shape", "digit", "first", "last", "count", "now")

DEFAULT_SIZE = 96
OBJECT_SIZE = (28, 40)  # pixels, the object's height; what a 16-px patch grid sees as 2-3 patches across
MAX_SPEED = 2.0  # pixels per frame
DRIFT_PERIOD = (16, 24)  # frames per pixel of background drift
DRIFT_MARGIN = 10  # the canvas is this much larger than the frame on every side
NOISE_LEVELS = 8  # noise = u1 + u2 - 7 with u uniform on 0..7: triangular, sigma 3.2, within +-7
REPEAT_PROBABILITY = 0.3  # an event shows an object seen before: count questions get answers above 1
STAY_PROBABILITY = 0.3  # the last event lasts to the end of the stream: "now" is not always "nothing"
UNSEEN_COUNT_QUESTIONS = 2  # count questions about objects that never appeared (answer "0")

# 5 x 7 glyphs of the digits, scaled 3x and emboldened by a pixel into 16 x 22 px with 4-px strokes:
# large enough that a ViT with 16-px patches sees each digit across two patches. Rows top to bottom.
_GLYPHS = {
    0: (".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."),
    1: ("..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."),
    2: (".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"),
    3: ("#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."),
    4: ("...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."),
    5: ("#####", "#....", "####.", "....#", "....#", "#...#", ".###."),
    6: ("..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."),
    7: ("#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."),
    8: (".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."),
    9: (".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."),
}
_GLYPH_SCALE = 3


def digit_mask(digit: int, scale: int = _GLYPH_SCALE) -> np.ndarray:
    """The digit as a boolean ink mask, (7 * scale + 1) x (5 * scale + 1), strokes scale + 1 thick."""
    glyph = np.array([[c == "#" for c in row] for row in _GLYPHS[digit]], dtype=bool)
    big = np.kron(glyph, np.ones((scale, scale), dtype=bool)).astype(bool)
    ink = np.zeros((big.shape[0] + 1, big.shape[1] + 1), dtype=bool)
    for dy in (0, 1):  # bold: the glyph OR itself shifted by a pixel right, down and both
        for dx in (0, 1):
            ink[dy:dy + big.shape[0], dx:dx + big.shape[1]] |= big
    return ink


# --------------------------------------------------------------------------------------------------
# What a stream contains.


@dataclass(frozen=True)
class SceneObject:
    """What is seen: two objects with the same kind, colour and digit are the same object."""

    kind: str  # one of SHAPES
    colour: str  # a key of COLOURS
    digit: int | None = None  # cards only

    @property
    def name(self) -> str:
        """How answers name it: "red circle", "blue card" (the digit has its own question)."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Event:
    """One appearance: `obj` is visible in frames start .. end-1, its centre moving in a straight line."""

    obj: SceneObject
    start: int
    end: int  # exclusive
    start_pos: tuple[int, int]  # centre (x, y) in pixels at frame start
    end_pos: tuple[int, int]  # centre at frame end-1
    size: int  # height in pixels

    def position(self, t: int) -> tuple[int, int]:
        """The centre at frame t (start <= t < end)."""
        span = self.end - 1 - self.start
        f = (t - self.start) / span if span > 0 else 0.0
        return (round(self.start_pos[0] + f * (self.end_pos[0] - self.start_pos[0])),
                round(self.start_pos[1] + f * (self.end_pos[1] - self.start_pos[1])))


@dataclass(frozen=True)
class Question:
    """A question, its one right answer, and where in the stream the answer was seen.

    evidence_frame is the most recent frame that shows what the answer needs (for "count", the last
    frame of the earliest appearance counted, since every appearance must be remembered; for a count of
    0, frame 0, since the whole stream must be; for "now", the last frame). depth = frames back from the
    end of the stream as asked: 0 is the last frame.
    """

    text: str
    answer: str
    kind: str  # one of QUESTION_KINDS
    evidence_frame: int
    depth: int


# --------------------------------------------------------------------------------------------------
# Drawing: a background canvas and one sprite per event, both made once.


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a coarse random grid, bilinearly interpolated (two small matrix products)."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw))

    def weights(n: int, g: int) -> np.ndarray:
        x = np.arange(n) / cell
        i = np.minimum(x.astype(int), g - 2)
        w = np.zeros((n, g))
        w[np.arange(n), i] = 1 - (x - i)
        w[np.arange(n), i + 1] = x - i
        return w

    return weights(height, gh) @ grid @ weights(width, gw).T


def _make_canvas(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A quiet scene: a grey-ish base, a faint tint, soft light and dark blotches, a little static grain."""
    base = rng.uniform(70, 150)
    tint = rng.uniform(-14, 14, size=3)  # low saturation: channels stay close to each other
    light = 28 * _smooth_field(rng, height, width, 28) + 10 * _smooth_field(rng, height, width, 9)
    hue = _smooth_field(rng, height, width, 40)[..., None] * rng.uniform(-8, 8, size=3)
    grain = rng.normal(0.0, 2.0, size=(height, width, 1))
    canvas = base + tint + light[..., None] + hue + grain
    return np.clip(canvas, 25, 200).astype(np.int16)  # below the white objects, above black ink


def shape_mask(kind: str, size: int) -> np.ndarray:
    """The silhouette of a shape whose height is `size` pixels, sampled at pixel centres."""
    if kind == "card":  # portrait, so it never reads as a square even before the digit is seen
        return np.ones((size, max(22, round(size * 0.72))), dtype=bool)
    if kind == "square":
        return np.ones((size, size), dtype=bool)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if kind == "circle":
        return (xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= (size / 2) ** 2
    if kind == "triangle":  # pointing up, base as wide as it is tall
        return np.abs(xx - size / 2) <= yy / 2
    raise ValueError(f"unknown shape {kind!r}; choose one of {', '.join(SHAPES)}")


@dataclass(frozen=True)
class _Sprite:
    mask: np.ndarray  # h x w bool
    pixels: np.ndarray  # n x 3 int16: the BGR values of the mask's pixels, in mask order


def _make_sprite(obj: SceneObject, size: int) -> _Sprite:
    mask = shape_mask(obj.kind, size)
    image = np.empty((*mask.shape, 3), dtype=np.int16)
    colour = COLOURS[obj.colour]
    image[:] = colour
    if obj.digit is not None:
        ink = digit_mask(obj.digit)
        # Dark ink on light cards, light ink on dark ones: the contrast a reader needs.
        luma = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2]
        h, w = ink.shape
        y0, x0 = (mask.shape[0] - h) // 2, (mask.shape[1] - w) // 2
        image[y0:y0 + h, x0:x0 + w][ink] = _INK_BLACK if luma > 140 else _INK_WHITE
    return _Sprite(mask=mask, pixels=image[mask])


# --------------------------------------------------------------------------------------------------
# The stream.


def _triangle_wave(step: int, span: int) -> int:
    """0, 1, ..., span, span-1, ..., 0, ...: a bounded drift that needs no state."""
    u = step % (2 * span)
    return u if u <= span else 2 * span - u


class Stream:
    """A rendered-on-demand stream: its events, its frames, and every question about it.

    Made by `make_stream`; frames are deterministic from (seed, t).
    """

    def __init__(self, seed: int, n_frames: int, size: int, events: Sequence[Event], unseen: Sequence[SceneObject],
                 canvas: np.ndarray, drift: tuple[int, int, int, int]) -> None:
        self.seed = seed
        self.n_frames = n_frames
        self.size = size
        self.events = tuple(events)
        self._unseen = tuple(unseen)  # the objects count questions ask about that never appeared
        self._canvas = canvas
        self._drift = drift  # (frames per pixel in x, in y, phase x, phase y)
        self._sprites = [_make_sprite(e.obj, e.size) for e in self.events]
        # Event starts, sorted: the event at frame t is found by bisection, with no per-frame table.
        self._starts = np.array([e.start for e in self.events], dtype=np.int64)

    def __repr__(self) -> str:
        return f"<Stream seed={self.seed} frames={self.n_frames} events={len(self.events)}>"

    def __len__(self) -> int:
        return self.n_frames

    def event_at(self, t: int) -> Event | None:
        """The event visible at frame t, or None."""
        i = self._event_index(t)
        return self.events[i] if i >= 0 else None

    def _event_index(self, t: int) -> int:
        i = int(np.searchsorted(self._starts, t, side="right")) - 1
        return i if i >= 0 and t < self.events[i].end else -1

    # -- frames --------------------------------------------------------------------------------------

    def _noise(self, t: int) -> np.ndarray:
        # A counter-based generator keyed by (seed, t): any frame is reproducible on its own, in any order.
        # The sum of two uniform 3-bit values is near enough to Gaussian for camera noise and 5x faster.
        n = self.size * self.size * 3
        raw = np.frombuffer(np.random.Generator(np.random.Philox(key=self.seed, counter=t)).bytes(2 * n), np.uint8)
        noise = (raw[:n] >> 5).astype(np.int16)
        noise += raw[n:] >> 5
        noise -= NOISE_LEVELS - 1
        return noise.reshape(self.size, self.size, 3)

    def frame(self, t: int) -> np.ndarray:
        """Frame t: size x size x 3 uint8, BGR (`frame[..., ::-1]` is RGB)."""
        if not 0 <= t < self.n_frames:
            raise IndexError(f"frame {t} is outside this stream of {self.n_frames} frames")
        px, py, phase_x, phase_y = self._drift
        ox = _triangle_wave(t // px + phase_x, 2 * DRIFT_MARGIN)
        oy = _triangle_wave(t // py + phase_y, 2 * DRIFT_MARGIN)
        image = self._canvas[oy:oy + self.size, ox:ox + self.size].copy()
        i = self._event_index(t)
        if i >= 0:
            sprite = self._sprites[i]
            cx, cy = self.events[i].position(t)
            h, w = sprite.mask.shape
            y0, x0 = cy - h // 2, cx - w // 2
            image[y0:y0 + h, x0:x0 + w][sprite.mask] = sprite.pixels
        image += self._noise(t)
        np.clip(image, 0, 255, out=image)
        return image.astype(np.uint8)

    def frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames start .. stop-1 as one array [n, size, size, 3] uint8, BGR."""
        stop = self.n_frames if stop is None else stop
        if not 0 <= start <= stop <= self.n_frames:
            raise IndexError(f"frames {start}..{stop} are outside this stream of {self.n_frames} frames")
        out = np.empty((stop - start, self.size, self.size, 3), dtype=np.uint8)
        for t in range(start, stop):
            out[t - start] = self.frame(t)
        return out

    # -- questions -----------------------------------------------------------------------------------

    def questions(self, until: int | None = None) -> list[Question]:
        """Every question with one right answer about frames 0 .. until-1 (default: the whole stream).

        `until` lets a trainer ask in the middle of a stream: the answers are what had been seen by then.
        """
        n = self.n_frames if until is None else until
        if not 1 <= n <= self.n_frames:
            raise ValueError(f"until must be in 1..{self.n_frames}, not {n}")
        # The events as seen by frame n-1: a later one not yet, one still going cut short.
        seen = [(e, min(e.end, n)) for e in self.events if e.start < n]
        out: list[Question] = []

        def add(text: str, answer: str, kind: str, evidence: int) -> None:
            out.append(Question(text, answer, kind, evidence, n - 1 - evidence))

        # colour / shape / digit: one answer only if every appearance agrees; the evidence is the latest.
        for kind in SHAPES:
            of_kind = [(e, end) for e, end in seen if e.obj.kind == kind]
            if of_kind and len({e.obj.colour for e, _ in of_kind}) == 1:
                add(f"What colour was the {kind}?", of_kind[0][0].obj.colour, "colour", of_kind[-1][1] - 1)
        for colour in COLOURS:
            of_colour = [(e, end) for e, end in seen if e.obj.colour == colour]
            if of_colour and len({e.obj.kind for e, _ in of_colour}) == 1:
                add(f"What shape was the {colour} object?", of_colour[0][0].obj.kind, "shape", of_colour[-1][1] - 1)
            cards = [(e, end) for e, end in of_colour if e.obj.kind == "card"]
            if cards and len({e.obj.digit for e, _ in cards}) == 1:
                add(f"What digit was on the {colour} card?", str(cards[0][0].obj.digit), "digit", cards[-1][1] - 1)
        if seen:
            add("What appeared first?", seen[0][0].obj.name, "first", seen[0][1] - 1)
            add("What appeared last?", seen[-1][0].obj.name, "last", seen[-1][1] - 1)
        # count: by colour and kind, as the question names them (two blue cards with different digits are
        # two blue cards), plus objects never seen.
        counted: dict[str, list[int]] = {}
        for e, end in seen:
            counted.setdefault(e.obj.name, []).append(end - 1)
        for obj in self._unseen:
            counted.setdefault(obj.name, [])
        for name, ends in counted.items():
            if len(ends) <= 9:
                add(f"How many times did a {name} appear?", str(len(ends)), "count", ends[0] if ends else 0)
        visible = seen[-1][0].obj.name if seen and seen[-1][1] == n else "nothing"
        add("What is visible now?", visible, "now", n - 1)
        return out

    def ask_set(self, rng_or_seed: np.random.Generator | int, n: int, until: int | None = None) -> list[Question]:
        """Up to n questions, the kinds as balanced as the stream allows, in a shuffled order.

        Kinds are taken in turn (each kind's questions shuffled), so a stream with nine count questions
        and one "now" still gives a mix rather than mostly counts.
        """
        rng = np.random.default_rng(rng_or_seed)
        by_kind: dict[str, list[Question]] = {}
        for q in self.questions(until):
            by_kind.setdefault(q.kind, []).append(q)
        pools = [[qs[i] for i in rng.permutation(len(qs))] for _, qs in sorted(by_kind.items())]
        pools = [pools[i] for i in rng.permutation(len(pools))]
        chosen: list[Question] = []
        while len(chosen) < n and any(pools):
            for pool in pools:
                if pool and len(chosen) < n:
                    chosen.append(pool.pop())
        return [chosen[i] for i in rng.permutation(len(chosen))]


# --------------------------------------------------------------------------------------------------
# Making a stream: the events first (a few numbers), pixels only when asked for.


def _place_events(rng: np.random.Generator, n_frames: int, n_events: tuple[int, int],
                  duration: tuple[int, int]) -> list[tuple[int, int]]:
    """(start, end) of non-overlapping events, at least one empty frame apart, start times spread evenly.

    The slack (frames not in an event) is cut into random gaps (stars and bars), so each start is as
    likely anywhere in the stream: the evidence lies at every depth, near and far.
    """
    lo, hi = duration
    count = int(rng.integers(n_events[0], n_events[1] + 1))
    lengths = [min(int(rng.integers(lo, hi + 1)), n_frames) for _ in range(count)]
    while lengths and sum(lengths) + len(lengths) - 1 > n_frames:  # a short clip holds fewer
        lengths.pop()
    if not lengths:
        return []
    slack = n_frames - sum(lengths) - (len(lengths) - 1)
    stays = rng.random() < STAY_PROBABILITY  # no gap after the last event: it is still there at the end
    n_gaps = len(lengths) + (0 if stays else 1)
    cuts = np.sort(rng.integers(0, slack + 1, size=n_gaps - 1))
    gaps = np.diff(np.concatenate([[0], cuts, [slack]])).tolist()
    spans, t = [], 0
    for i, length in enumerate(lengths):
        t += gaps[i] + (1 if i else 0)
        spans.append((t, t + length))
        t += length
    return spans


def _pick_object(rng: np.random.Generator, previous: list[SceneObject]) -> SceneObject:
    if previous and rng.random() < REPEAT_PROBABILITY:
        return previous[int(rng.integers(len(previous)))]
    kind = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    return SceneObject(kind, colour, int(rng.integers(10)) if kind == "card" else None)


def _path(rng: np.random.Generator, frame: int, extent: tuple[int, int],
          frames: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Start and end centre: inside the frame all the way, still half the time, else at most MAX_SPEED."""
    h, w = extent
    x_range = (w // 2, frame - (w - w // 2))  # centre limits that keep the whole sprite in view
    y_range = (h // 2, frame - (h - h // 2))
    x0, y0 = (int(rng.integers(r[0], r[1] + 1)) for r in (x_range, y_range))
    if rng.random() < 0.5 or frames < 2:
        return (x0, y0), (x0, y0)
    speed = rng.uniform(0.5, MAX_SPEED)
    heading = rng.uniform(0, 2 * math.pi)
    # Rounding toward zero and clipping to the frame only shorten the path: the speed stays under the limit.
    travel = speed * (frames - 1)
    x1 = int(np.clip(x0 + int(travel * math.cos(heading)), *x_range))
    y1 = int(np.clip(y0 + int(travel * math.sin(heading)), *y_range))
    return (x0, y0), (x1, y1)


def make_stream(seed: int, n_frames: int, n_events: tuple[int, int] = (2, 6), duration: tuple[int, int] = (3, 8),
                size: int = DEFAULT_SIZE) -> Stream:
    """A stream of n_frames frames, deterministic from seed.

    n_events: how many appearances, drawn uniformly in this range; not scaled with the stream's length,
    so long streams are mostly empty, as a fixed camera's are. A clip too short for them holds fewer
    (always at least one if n_events allows). duration: frames an appearance lasts, drawn uniformly
    (the last may instead last to the end of the stream). size: frame height and width in pixels.
    """
    if seed < 0:  # the noise generator's key is the seed itself
        raise ValueError(f"the seed must be a non-negative integer, not {seed}")
    if n_frames < 1:
        raise ValueError(f"a stream needs at least one frame, not {n_frames}")
    if size < OBJECT_SIZE[1] + 8:
        raise ValueError(f"frames must be at least {OBJECT_SIZE[1] + 8} px to hold an object, not {size}")
    if not 0 <= n_events[0] <= n_events[1] or not 1 <= duration[0] <= duration[1]:
        raise ValueError(f"bad ranges: n_events {n_events}, duration {duration}")
    rng = np.random.default_rng([seed, 0x5CE7E])  # salted, so seed 0 here is not seed 0 elsewhere
    side = size + 2 * DRIFT_MARGIN
    canvas = _make_canvas(rng, side, side)
    drift = (int(rng.integers(*DRIFT_PERIOD)), int(rng.integers(*DRIFT_PERIOD)),
             int(rng.integers(4 * DRIFT_MARGIN)), int(rng.integers(4 * DRIFT_MARGIN)))
    events: list[Event] = []
    for start, end in _place_events(rng, n_frames, n_events, duration):
        obj = _pick_object(rng, [e.obj for e in events])
        height = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
        extent = shape_mask(obj.kind, height).shape
        p0, p1 = _path(rng, size, extent, end - start)
        events.append(Event(obj, start, end, p0, p1, height))
    appeared = {e.obj.name for e in events}
    candidates = [f"{c} {k}" for c in COLOURS for k in SHAPES if f"{c} {k}" not in appeared]
    unseen = [SceneObject(kind, colour) for colour, kind in
              (candidates[i].split() for i in rng.permutation(len(candidates))[:UNSEEN_COUNT_QUESTIONS])]
    return Stream(seed, n_frames, size, events, unseen, canvas, drift)


# --------------------------------------------------------------------------------------------------
# Grading.

_STRIP = string.whitespace + string.punctuation


def normalise(text: str) -> str:
    """Lower case, the first line only, outer whitespace and punctuation off, inner spaces single."""
    stripped = text.strip(_STRIP)
    first = stripped.splitlines()[0] if stripped else ""
    return " ".join(first.lower().strip(_STRIP).split())


def grade(answer_text: str, truth: str) -> bool:
    """Whether a model's answer is the truth: exact match after `normalise` ("Red circle." is right,
    "It was a red circle" is not: the trained model answers in the task's words)."""
    return normalise(answer_text) == normalise(truth)
