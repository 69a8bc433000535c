"""`edge-runtime serve` as its users meet it: a real server process (uvicorn) on loopback with two synthetic
streams under different budgets on the tiny real models, the OpenAI client library, a real MQTT broker
(Debian's mosquitto), a webhook receiver, and bad requests that must each get their JSON error and leave
the streams running."""

from __future__ import annotations

import http.server
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import paho.mqtt.client as mqtt
import pytest
from wallclock import wait_until, wall_s

from edge_runtime.checkpoint import NEWEST, read_checkpoint

KEY = "test-key"
BUDGETS = {"door": 64, "yard": 128}  # 16 tokens a frame: passes every frame or two on both


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running `edge-runtime serve` and an HTTP client for it."""

    def __init__(self, argv: list[str], port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=wall_s(60))
        deadline = time.monotonic() + wall_s(90)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            try:
                if self.http.get("/v1/streams").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not answer in 90 s")

    def status(self, name: str) -> dict:
        return self.http.get(f"/v1/streams/{name}").json()["status"] or {}

    def frames(self, name: str) -> int:
        return self.status(name).get("frames", 0)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=wall_s(60))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.http.close()
        return self.proc.returncode, err


def serve_argv(fixtures: dict[str, Path], port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edge_runtime", "serve", "--model", str(fixtures["model"]),
            "--mmproj", str(fixtures["mmproj"]), "--threads", "2", "--realtime", "--fps", "8",
            "--budget", "96", "--max-answer-tokens", "24", "--port", str(port), "--api-key", KEY,
            *(a for name, budget in BUDGETS.items() for a in ("--stream", f"{name}:{budget}=synthetic:{budget}")),
            *extra]


@pytest.fixture(scope="module")
def broker() -> Iterator[int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    assert Path(binary).exists(), "the MQTT test needs Debian's mosquitto (apt-get install mosquitto; .ci/run does)"
    port = free_port()
    proc = subprocess.Popen([binary, "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wall_s(10)
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield port
    proc.terminate()
    proc.wait(wall_s(10))


class Webhook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def webhook() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Webhook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


@pytest.fixture(scope="module")
def server(fixtures: dict[str, Path], broker: int, webhook: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    memory_dir = tmp_path_factory.mktemp("serve-memory")
    s = Server(serve_argv(fixtures, port, "--mqtt", f"127.0.0.1:{broker}", "--webhook", webhook,
                          "--memory-dir", str(memory_dir)), port)
    s.memory_dir = memory_dir
    yield s
    if s.proc.poll() is None:
        s.stop()


# -- the OpenAI client, two budgets -------------------------------------------------------------------------

def test_an_openai_client_gets_a_streamed_answer_while_both_streams_keep_their_budgets(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY)
    assert sorted(m.id for m in client.models.list()) == sorted(BUDGETS)
    wait_until(lambda: all(server.status(n).get("passes", 0) >= 2 for n in BUDGETS), what="a few passes on both")
    frames_before = {n: server.frames(n) for n in BUDGETS}
    pieces, finish = [], None
    for _ in range(3):
        for name in BUDGETS:
            stream = client.chat.completions.create(
                model=name, stream=True, messages=[{"role": "user", "content": "What is on the left?"},
                                                   {"role": "assistant", "content": "a square"},
                                                   {"role": "user", "content": "And now?"}])
            for chunk in stream:
                pieces.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
    assert sum(bool(p) for p in pieces) >= 6 and finish in ("stop", "length")  # the tiny model's text: any tokens
    whole = client.chat.completions.create(model="door", messages=[{"role": "user", "content": "What moved?"}])
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content is not None

    # Both streams went on while they were questioned, each within its own budget.
    wait_until(lambda: all(server.frames(n) > frames_before[n] for n in BUDGETS), what="frames on both streams")
    for name, budget in BUDGETS.items():
        status = server.status(name)
        assert status["budget"] == budget and 0 < status["video_tokens"] <= budget, (name, status)


def test_events_carry_each_streams_statuses_and_answers_filtered_by_stream(server: Server) -> None:
    seen: list[dict] = []
    with httpx.stream("GET", server.url + "/v1/events", params={"stream": "yard"},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=wall_s(30)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        asked = False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            seen.append(json.loads(line[6:]))
            if not asked:
                server.http.post("/v1/chat/completions", json={"model": "yard", "messages": [
                    {"role": "user", "content": "What is there?"}]})
                asked = True
            if any(e["event"] == "answer" for e in seen) and sum(e["event"] == "status" for e in seen) >= 3:
                break
    assert {e["stream"] for e in seen} == {"yard"}
    assert max(e["video_tokens"] for e in seen if e["event"] == "status") <= BUDGETS["yard"]


# -- bad requests --------------------------------------------------------------------------------------------

BAD = [  # (method, path, body, headers, status, what the message says)
    ("GET", "/v1/streams", None, {"Authorization": "Bearer wrong"}, 401, "API key"),
    ("GET", "/v1/streams", None, {"Authorization": ""}, 401, "API key"),
    ("GET", "/v1/streams/nope", None, {}, 404, "no stream named 'nope'"),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, {}, 404,
     "no stream named 'nope'"),
    ("POST", "/v1/chat/completions", b"{not json", {"Content-Type": "application/json"}, 400, "malformed request"),
    ("POST", "/v1/chat/completions", {"model": "door"}, {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": "door", "messages": [{"role": "assistant", "content": "x"}]}, {}, 400,
     "last message must be the user's question"),
    ("POST", "/v1/chat/completions", {"model": "door", "messages": [{"role": "user", "content": "why " * 3000}]},
     {}, 413, "characters"),
    ("POST", "/v1/chat/completions", {"model": "door", "messages": [{"role": "user", "content": "why " * 1500}]},
     {}, 413, "tokens but only"),  # under the character cap, over the question room
    ("POST", "/v1/chat/completions", {"model": "door", "stream": True,
                                      "messages": [{"role": "user", "content": "why " * 1500}]},
     {}, 413, "tokens but only"),  # streamed: still an HTTP error, before any chunk
    ("POST", "/v1/chat/completions", b"x" * 300_000, {"Content-Type": "application/json"}, 413, "bytes"),
    ("POST", "/v1/streams", {"name": "bad name!", "source": "synthetic"}, {}, 400, "stream name"),
    ("POST", "/v1/streams", {"name": "door", "source": "synthetic"}, {}, 409, "exists already"),
    ("POST", "/v1/streams", {"name": "cam", "source": "/nope/clip.mp4"}, {}, 400, "does not exist"),
    ("DELETE", "/v1/streams/nope", None, {}, 404, "no stream"),
    ("POST", "/v1/alerts", {"stream": "door", "prompt": "Door open?", "every": 5, "when": {"rhymes": "x"}}, {}, 400,
     "one condition"),
    ("POST", "/v1/alerts", {"stream": "door", "prompt": "Door open?", "every": -1}, {}, 400, "every"),
    ("DELETE", "/v1/alerts/alert-999", None, {}, 404, "no alert"),
]


@pytest.mark.parametrize("case", BAD, ids=[f"{c[0]} {c[1]} {c[4]} {c[5]}" for c in BAD])
def test_a_bad_request_gets_its_json_error_and_the_streams_go_on(server: Server, case: tuple) -> None:
    method, path, body, headers, status, says = case
    before = server.frames("door")
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = server.http.request(method, path, headers=headers, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and "Traceback" not in r.text and "\n" not in error["message"]
    wait_until(lambda: server.frames("door") > before, what="the stream went on")


def test_a_client_that_leaves_mid_answer_costs_nothing(server: Server) -> None:
    for _ in range(3):
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": "door", "stream": True, "messages": [{"role": "user", "content": "Tell."}]},
                          timeout=wall_s(30)) as r:
            next(r.iter_lines())  # the first chunk, then hang up
    answer = server.http.post("/v1/chat/completions", json={"model": "door", "messages": [
        {"role": "user", "content": "Still there?"}]})
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] is not None
    before = server.frames("door")
    wait_until(lambda: server.frames("door") > before, what="the stream went on")


# -- streams come and go, alerts, MQTT, webhook -------------------------------------------------------------

def test_a_stream_added_and_removed_while_the_server_runs(server: Server) -> None:
    r = server.http.post("/v1/streams", json={"name": "porch", "source": "synthetic:9", "budget": 48})
    assert r.status_code == 201 and r.json()["budget"] == 48
    wait_until(lambda: server.frames("porch") >= 5, what="porch frames")
    assert "porch" in [m["id"] for m in server.http.get("/v1/models").json()["data"]]
    assert server.status("porch")["video_tokens"] <= 48
    assert server.http.delete("/v1/streams/porch").status_code == 200
    assert server.http.get("/v1/streams/porch").status_code == 404
    assert (server.memory_dir / "porch" / NEWEST).is_file()  # it left its checkpoint behind


def test_alerts_fire_as_events_on_mqtt_and_the_webhook(server: Server, broker: int) -> None:
    messages: list[tuple[str, dict, bool]] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    client.on_message = lambda c, u, m: messages.append((m.topic, json.loads(m.payload), m.retain))
    client.connect("127.0.0.1", broker)
    client.subscribe("edge-runtime/#")
    client.loop_start()
    try:
        fires = server.http.post("/v1/alerts", json={"stream": "door", "prompt": "Is anything there?", "every": 0.5,
                                                     "when": {"contains": ""}})  # every answer contains ""
        never = server.http.post("/v1/alerts", json={"stream": "yard", "prompt": "Is a zebra there?", "every": 0.5,
                                                     "when": {"equals": "a zebra in a hat"}})
        assert fires.status_code == 201 and never.status_code == 201
        listed = {a["id"]: a for a in server.http.get("/v1/alerts").json()["data"]}
        assert listed[fires.json()["id"]]["when"] == {"contains": ""}
        wait_until(lambda: any(t == "edge-runtime/door/alert" for t, _, _ in messages), what="an alert on MQTT")
        wait_until(lambda: len(Webhook.received) >= 1, what="an alert at the webhook")
        hook = Webhook.received[0]
        assert hook["event"] == "alert" and hook["stream"] == "door" and hook["alert"] == fires.json()["id"]
        for a in (fires, never):
            assert server.http.delete(f"/v1/alerts/{a.json()['id']}").status_code == 200
        assert not any(t == "edge-runtime/yard/alert" for t, _, _ in messages)
        statuses = [(p, retained) for t, p, retained in messages if t == "edge-runtime/yard/status"]
        assert statuses and all(p["video_tokens"] <= BUDGETS["yard"] for p, _ in statuses)
    finally:
        client.loop_stop()
        client.disconnect()
    late = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)  # a dashboard that connects later: the retained status
    got: list = []
    late.on_message = lambda c, u, m: got.append(m)
    late.connect("127.0.0.1", broker)
    late.subscribe("edge-runtime/door/status")
    late.loop_start()
    try:
        wait_until(lambda: bool(got), 10, what="the retained status")
        assert got[0].retain
    finally:
        late.loop_stop()
        late.disconnect()


def test_sigterm_saves_every_stream_and_exits_0(server: Server) -> None:
    frames = {n: server.frames(n) for n in BUDGETS}
    rc, err = server.stop()
    assert rc == 0, err
    assert "Traceback" not in err
    for name in BUDGETS:
        meta = read_checkpoint(server.memory_dir / name / NEWEST).meta
        assert meta["frames_seen"] >= frames[name] and meta["settings"]["budget"] == BUDGETS[name]


def test_listening_beyond_loopback_needs_a_key(fixtures: dict[str, Path]) -> None:
    argv = [a for a in serve_argv(fixtures, free_port(), "--host", "0.0.0.0") if a not in ("--api-key", KEY)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=wall_s(30))
    assert run.returncode == 2 and "opens the API to the network: add --api-key KEY" in run.stderr
