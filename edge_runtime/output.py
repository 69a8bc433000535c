"""Everything the user of `edge-runtime` sees: a live status line and answers on a terminal, or one JSON
object a line for programs. The CLI's run and the demo both speak through `Output`."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict

from edge_runtime.checkpoint import SaveReport
from edge_runtime.scenes import Question
from edge_runtime.session import Answer, Status

log = logging.getLogger(__name__)


def human_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


class Output:
    """Everything the user sees: a live status line on a terminal, or JSON lines for programs."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.live = not as_json and sys.stderr.isatty()
        self._status_shown = False

    def emit(self, event: str, **data: object) -> None:
        print(json.dumps({"event": event, **data}), flush=True)

    def status(self, status: Status) -> None:
        if self.as_json:
            self.emit("status", **asdict(status))
        elif self.live:
            line = (f"frames {status.frames} | memory {status.frames_in_memory} frames, "
                    f"{status.video_tokens}/{status.budget} tokens, KV {human_bytes(status.kv_bytes)}, "
                    f"{status.passes} passes | "
                    f"RSS {status.rss_mb:.0f} MB | {status.frames_per_s:.2f} frames/s")
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
            self._status_shown = True

    def break_status_line(self) -> None:
        if self._status_shown:
            sys.stderr.write("\n")
            self._status_shown = False

    def answer_start(self, question: str) -> None:
        if not self.as_json:
            self.break_status_line()
            print(f"Q: {question}\nA: ", end="", flush=True)

    def token(self, piece: str) -> None:
        if not self.as_json:
            print(piece, end="", flush=True)

    def answer_end(self, answer: Answer) -> None:
        if self.as_json:
            data = asdict(answer)
            data["answer"] = data.pop("text")
            self.emit("answer", **data)
        else:
            print(f"\n   ({answer.ttft_ms:.0f} ms to first token, {answer.tokens_per_s:.1f} tokens/s)", flush=True)

    def alert(self, alert_id: str, prompt: str, answer: Answer, timestamp: float) -> None:
        """A watch prompt whose answer met its condition."""
        if self.as_json:
            self.emit("alert", alert=alert_id, prompt=prompt, answer=answer.text, frames=answer.frames,
                      timestamp=timestamp)
        else:
            self.notice(f"ALERT {alert_id} at {timestamp:.1f} s: {prompt} -> {answer.text}")

    def checkpoint(self, report: SaveReport) -> None:
        """A checkpoint written: an event for programs (the soak reads its time and size), a debug line else."""
        if self.as_json:
            self.emit("checkpoint", path=str(report.path), bytes=report.bytes, seconds=round(report.seconds, 4),
                      frames=report.frames_seen)
        else:
            log.debug("checkpoint %s: %s in %.2f s", report.path, human_bytes(report.bytes), report.seconds)

    def notice(self, message: str) -> None:
        if self.as_json:
            self.emit("notice", message=message)
        else:
            self.break_status_line()
            print(message, file=sys.stderr, flush=True)

    def say(self, text: str) -> None:
        """A line of a report for people, on stdout; nothing in JSON, where the events carry the facts."""
        if not self.as_json:
            self.break_status_line()
            print(text, flush=True)

    def graded(self, frames: int, question: Question, answer: str, correct: bool) -> None:
        """An answer to a question whose truth is known (the demo), graded, with the truth beside it."""
        if self.as_json:
            self.emit("answer", frames=frames, question=question.text, answer=answer, truth=question.answer,
                      kind=question.kind, depth=question.depth, correct=correct)
        else:
            mark = "right" if correct else "WRONG"
            self.say(f"  {question.text:<44} {answer.strip()!r:<18} truth {question.answer!r:<18} {mark}")
