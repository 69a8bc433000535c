"""The HTTP API of `edge-runtime serve` (FastAPI): streams, OpenAI-style chat completions with server-sent
events, watch prompts that alert, the event stream, and the page at `/`.

Everything that touches llama.cpp goes through the Hub (edge_runtime.serve) as a job; handlers only wait for
it. Errors are JSON in OpenAI's shape, {"error": {"message", "type", "code"}}, with the status that fits:
400 a malformed request, 401 a missing or wrong key, 404 an unknown stream or alert, 409 a name in use,
413 a question or body too long, 503 shutting down.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from edge_runtime.errors import ModelError, QuestionTooLong, SettingsError
from edge_runtime.events import EventBus, MqttSink, WebhookSink
from edge_runtime.model import VisionLanguageModel
from edge_runtime.opencv import cv2
from edge_runtime.serve import Hub, StreamSpec, UnknownStream
from edge_runtime.sources import SourceError
from edge_runtime.stream import MATCHES

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024  # bytes: a chat request with its history is a few KB; anything this big is not one
QUESTION_CHARS = 8000  # a question longer than this cannot fit any question room


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def error_response(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


# -- requests ----------------------------------------------------------------------------------------------

class NewStream(BaseModel):
    name: str
    source: str
    budget: int | None = Field(default=None, gt=0)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI's content parts: the text ones
            return "".join(str(part.get("text", "")) for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(BaseModel):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)


class NewAlert(BaseModel):
    stream: str
    prompt: str = Field(min_length=1, max_length=QUESTION_CHARS)
    every: float = Field(gt=0, description="seconds of stream time between two asks")
    when: dict[str, str] | None = Field(default=None, description='e.g. {"starts_with": "yes"}')


def conversation(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """The last user message is the question; the user/assistant pairs before it are the history."""
    users = [i for i, m in enumerate(messages) if m.role == "user"]
    if not users or users[-1] != len(messages) - 1:
        raise ApiError(400, "the last message must be the user's question")
    question = messages[-1].text().strip()
    if not question:
        raise ApiError(400, "the question (the last user message) is empty")
    if len(question) > QUESTION_CHARS:
        raise ApiError(413, f"the question has {len(question)} characters; at most {QUESTION_CHARS} fit",
                       code="question_too_long")
    history, pending = [], None
    for m in messages[:-1]:
        if m.role == "user":
            pending = m.text()
        elif m.role == "assistant" and pending is not None:
            history.append((pending, m.text()))
            pending = None
    return question, history


# -- the app -----------------------------------------------------------------------------------------------

def create_app(hub: Hub, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="edge-runtime", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's middleware signature
        if request.url.path.startswith("/v1/"):
            if api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else request.query_params.get("key", "")
                if not hmac.compare_digest(token.encode(), api_key.encode()):
                    return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                          "authentication_error", "invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > MAX_BODY:
                return error_response(413, f"the request body has {length} bytes; at most {MAX_BODY} are taken",
                                      code="body_too_large")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.kind, e.code)

    @app.exception_handler(RequestValidationError)
    async def malformed(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(400, f"malformed request: {where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else
                              "invalid_request_error")

    async def run(future_job) -> Any:  # noqa: ANN001 - a concurrent.futures.Future from the hub
        try:
            return await asyncio.wrap_future(future_job)
        except UnknownStream as e:
            raise ApiError(404, str(e), "not_found_error", "stream_not_found") from None
        except QuestionTooLong as e:
            raise ApiError(413, str(e), code="question_too_long") from None
        except SettingsError as e:
            raise ApiError(409 if "exists already" in str(e) else 400, str(e)) from None
        except ModelError as e:
            raise ApiError(503, str(e), "server_error") from None

    def stream_info(name: str) -> dict:
        served = hub.get(name)
        return {"name": name, "source": served.spec.source, "description": served.description,
                "budget": served.stream.session.memory.budget, "ended": served.stream.ended,
                "status": served.events.last_status}

    # -- streams -------------------------------------------------------------------------------------

    @app.get("/v1/streams")
    async def list_streams() -> dict:
        return {"object": "list", "data": [stream_info(n) for n in list(hub.streams)]}

    @app.get("/v1/streams/{name}")
    async def get_stream(name: str) -> dict:
        try:
            return stream_info(name)
        except UnknownStream as e:
            raise ApiError(404, str(e), "not_found_error", "stream_not_found") from None

    @app.post("/v1/streams", status_code=201)
    async def add_stream(body: NewStream) -> dict:
        try:
            spec = StreamSpec.checked(body.name, body.source, body.budget)
        except SettingsError as e:
            raise ApiError(400, str(e)) from None
        if spec.name in hub.streams:
            raise ApiError(409, f"a stream named {spec.name!r} exists already: DELETE /v1/streams/{spec.name} first")
        try:
            source = await asyncio.to_thread(hub.open_source, spec)  # a URL may take its time-out
        except SourceError as e:
            raise ApiError(400, str(e), code="bad_source") from None
        await run(hub.add(spec, source))
        return stream_info(spec.name)

    @app.delete("/v1/streams/{name}")
    async def delete_stream(name: str) -> dict:
        await run(hub.remove(name))
        return {"name": name, "deleted": True}

    @app.get("/v1/streams/{name}/frame.jpg")
    async def latest_frame(name: str) -> Response:
        try:
            frame = hub.get(name).stream.last_frame
        except UnknownStream as e:
            raise ApiError(404, str(e), "not_found_error", "stream_not_found") from None
        if frame is None:
            raise ApiError(404, f"stream {name} has no frame yet", "not_found_error")
        ok, jpeg = await asyncio.to_thread(cv2.imencode, ".jpg", frame.image)
        return Response(jpeg.tobytes(), media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    @app.get("/v1/streams/{name}/memory")
    async def memory(name: str) -> dict:
        return {"object": "list", "stream": name, "data": await run(hub.memory_view(name))}

    @app.get("/v1/streams/{name}/frames/{index}.jpg")
    async def thumbnail(name: str, index: int) -> Response:
        try:
            jpeg = hub.get(name).thumbnails.get(index)
        except UnknownStream as e:
            raise ApiError(404, str(e), "not_found_error", "stream_not_found") from None
        if jpeg is None:
            raise ApiError(404, f"frame {index} of {name} is not in memory", "not_found_error")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    # -- OpenAI-compatible ---------------------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "edge-runtime"}
                                           for n in list(hub.streams)]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if body.model not in hub.streams:
            raise ApiError(404, str(UnknownStream(body.model)), "not_found_error", "model_not_found")
        question, history = conversation(body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def chunk(delta: dict, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                                          "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                                            "finish_reason": finish}]}) + "\n\n"

        if not body.stream:
            answer = await run(hub.ask(body.model, question, history, max_tokens=max_tokens))
            return JSONResponse(completion(reply_id, created, body.model, answer))

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        gone = threading.Event()
        future = hub.ask(body.model, question, history, on_token=lambda p: loop.call_soon_threadsafe(
            pieces.put_nowait, p), gone=gone, max_tokens=max_tokens)
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(pieces.put_nowait, None))
        first = await pieces.get()  # a question that cannot be answered is an HTTP error, not a broken stream
        if first is None:
            await run(future)

        async def events() -> AsyncIterator[str]:
            try:
                yield chunk({"role": "assistant", "content": ""})
                piece = first
                while piece is not None:
                    yield chunk({"content": piece})
                    piece = await pieces.get()
                try:
                    answer = future.result()
                except (ModelError, UnknownStream) as e:
                    yield "data: " + json.dumps({"error": {"message": str(e), "type": "server_error"}}) + "\n\n"
                    return
                yield chunk({}, "length" if max_tokens and answer.n_tokens >= max_tokens else "stop")
                yield "data: [DONE]\n\n"
            finally:
                gone.set()  # a client that went away mid-answer: the hub stops at the next piece

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- watch prompts that alert --------------------------------------------------------------------

    @app.post("/v1/alerts", status_code=201)
    async def add_alert(body: NewAlert) -> dict:
        match, text = None, ""
        if body.when:
            if len(body.when) != 1 or next(iter(body.when)) not in MATCHES:
                raise ApiError(400, f"'when' takes one condition, one of {', '.join(MATCHES)}: "
                                    'e.g. {"starts_with": "yes"}')
            match, text = next(iter(body.when.items()))
        watch = await run(hub.add_alert(body.stream, body.prompt, body.every, match, text))
        return alert_info(body.stream, watch)

    @app.get("/v1/alerts")
    async def list_alerts() -> dict:
        return {"object": "list", "data": [alert_info(n, w) for n, s in list(hub.streams.items())
                                           for w in list(s.stream.watches) if w.id]}

    @app.delete("/v1/alerts/{alert_id}")
    async def delete_alert(alert_id: str) -> dict:
        if not await run(hub.remove_alert(alert_id)):
            raise ApiError(404, f"no alert {alert_id!r}: GET /v1/alerts lists them", "not_found_error")
        return {"id": alert_id, "deleted": True}

    # -- events --------------------------------------------------------------------------------------

    @app.get("/v1/events")
    async def event_stream(request: Request, stream: str | None = None) -> StreamingResponse:
        if stream is not None and stream not in hub.streams:
            raise ApiError(404, str(UnknownStream(stream)), "not_found_error", "stream_not_found")
        q = hub.bus.subscribe(stream)

        async def events() -> AsyncIterator[str]:
            try:
                yield ": connected\n\n"
                while True:
                    try:
                        event = await asyncio.wait_for(q.get(), timeout=15.0)
                    except asyncio.TimeoutError:
                        yield ": keep-alive\n\n"  # proxies close silent connections
                        continue
                    yield f"event: {event['event']}\ndata: {json.dumps(event)}\n\n"
            finally:
                hub.bus.unsubscribe(q)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # -- the page ------------------------------------------------------------------------------------

    page = resources.files("edge_runtime").joinpath("web/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    return app


def completion(reply_id: str, created: int, model: str, answer: Any) -> dict:
    return {"id": reply_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": answer.n_tokens, "total_tokens": answer.n_tokens},
            "edge_runtime": {k: v for k, v in dataclasses.asdict(answer).items() if k != "text"}}


def alert_info(stream: str, watch: Any) -> dict:
    return {"id": watch.id, "stream": stream, "prompt": watch.prompt, "every": watch.every,
            "when": {watch.match: watch.text} if watch.match else None, "next_due": watch.next_due}


def run_server(args: argparse.Namespace, model: VisionLanguageModel,
               make_session: Callable[[int | None], object]) -> int:
    """Run the server until SIGTERM or Ctrl-C: streams from --stream, the API on --host:--port."""
    import uvicorn

    bus = EventBus()
    sinks: list = []
    if args.mqtt:
        sinks.append(MqttSink(args.mqtt))
    if args.webhook:
        sinks.append(WebhookSink(args.webhook))
    for sink in sinks:
        bus.add_sink(sink)
    hub = Hub(model, args, bus, make_session)
    hub.start()
    try:
        for spec in args.streams:
            hub.add(spec, hub.open_source(spec)).result()
        app = create_app(hub, api_key=args.api_key)
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        log.info("serving on http://%s:%d", args.host, args.port)
        bus.publish({"event": "notice", "message": f"serving on http://{args.host}:{args.port}/"})
        server.run()  # returns on SIGTERM or Ctrl-C (uvicorn's handlers)
    finally:
        hub.close()
        for sink in sinks:
            sink.close()
    return 0

