"""Where `edge-runtime serve` tells what happens: one bus, the same event objects as `--json` prints, each with
its stream's name. Subscribers are the HTTP API's server-sent events (`GET /v1/events`), MQTT
(`edge-runtime/<stream>/<event>`) and a webhook (alerts). Publishing never waits for a subscriber: a slow
client loses its oldest events, a broker that is down loses its messages, the streams go on.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from edge_runtime.checkpoint import SaveReport
    from edge_runtime.session import Answer, Status

log = logging.getLogger(__name__)

SUBSCRIBER_EVENTS = 256  # events a slow SSE client may fall behind before its oldest are dropped


class EventBus:
    """Thread-safe: the llama.cpp thread publishes, HTTP handlers subscribe from the event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, str | None]] = []
        self._sinks: list[Callable[[dict], None]] = []

    def add_sink(self, sink: Callable[[dict], None]) -> None:
        """A callable that gets every event on the publishing thread; it must not block (MQTT, webhook queue)."""
        self._sinks.append(sink)

    def publish(self, event: dict) -> None:
        event.setdefault("time", round(time.time(), 3))
        with self._lock:
            subscribers = list(self._subscribers)
        for loop, q, stream in subscribers:
            if stream is None or event.get("stream") == stream:
                try:
                    loop.call_soon_threadsafe(_offer, q, event)
                except RuntimeError:  # its loop is closed: the server is shutting down
                    pass
        for sink in self._sinks:
            try:
                sink(event)
            except Exception as e:  # a sink must never stop a stream
                log.warning("event sink %s failed: %s", getattr(sink, "__name__", sink), e)

    def subscribe(self, stream: str | None = None) -> asyncio.Queue:
        """From the event loop: a queue of the events of `stream` (None: all)."""
        q: asyncio.Queue = asyncio.Queue(maxsize=SUBSCRIBER_EVENTS)
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), q, stream))
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[1] is not q]


def _offer(q: asyncio.Queue, event: dict) -> None:
    if q.full():
        q.get_nowait()  # a slow client: its oldest event goes
    q.put_nowait(event)


class StreamEvents:
    """What a Stream tells (the methods of edge_runtime.output.Output), as events on the bus with its name."""

    def __init__(self, bus: EventBus, stream: str) -> None:
        self.bus, self.stream = bus, stream
        self.last_status: dict | None = None  # read by GET /v1/streams without touching llama.cpp

    def _publish(self, event: str, **data: object) -> None:
        self.bus.publish({"event": event, "stream": self.stream, **data})

    def status(self, status: Status) -> None:
        self.last_status = asdict(status)
        self._publish("status", **self.last_status)

    def notice(self, message: str) -> None:
        self._publish("notice", message=message)

    def answer_start(self, question: str) -> None:
        pass

    def token(self, piece: str) -> None:
        pass

    def answer_end(self, answer: Answer) -> None:
        data = asdict(answer)
        data["answer"] = data.pop("text")
        self._publish("answer", **data)

    def alert(self, alert_id: str, prompt: str, answer: Answer, timestamp: float) -> None:
        self._publish("alert", alert=alert_id, prompt=prompt, answer=answer.text, frames=answer.frames,
                      timestamp=timestamp)

    def checkpoint(self, report: SaveReport) -> None:
        self._publish("checkpoint", path=str(report.path), bytes=report.bytes, seconds=round(report.seconds, 4),
                      frames=report.frames_seen)


# -- MQTT ------------------------------------------------------------------------------------------------

class MqttSink:
    """Every event to `edge-runtime/<stream>/<event>` (JSON), the status retained: a dashboard that connects
    later sees each stream's latest status at once. paho's network loop runs on its own thread and reconnects
    by itself; publishing only queues."""

    TOPIC = "edge-runtime"

    def __init__(self, address: str, client_id: str = "edge-runtime") -> None:
        import paho.mqtt.client as mqtt

        host, _, port = address.rpartition(":") if ":" in address else (address, "", "1883")
        self.host, self.port = host or address, int(port or 1883)
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.reconnect_delay_set(1, 30)
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        self.__name__ = f"mqtt {self.host}:{self.port}"

    def __call__(self, event: dict) -> None:
        stream = event.get("stream", "_server")
        self.client.publish(f"{self.TOPIC}/{stream}/{event['event']}", json.dumps(event), qos=0,
                            retain=event["event"] == "status")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# -- webhook ---------------------------------------------------------------------------------------------

class WebhookSink:
    """Alerts POSTed as JSON to a URL, from a thread of its own (a slow receiver delays nobody; what it cannot
    take in time is dropped with a warning)."""

    def __init__(self, url: str, timeout_s: float = 5.0, events: tuple[str, ...] = ("alert",)) -> None:
        self.url, self.timeout_s, self.events = url, timeout_s, events
        self._queue: queue.Queue[dict | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()
        self.__name__ = f"webhook {url}"

    def __call__(self, event: dict) -> None:
        if event["event"] in self.events:
            try:
                self._queue.put_nowait(event)
            except queue.Full:
                log.warning("webhook %s is behind: an alert was dropped", self.url)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            request = urllib.request.Request(self.url, data=json.dumps(event).encode(), method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    response.read()
            except OSError as e:
                log.warning("webhook %s failed: %s", self.url, e)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(self.timeout_s + 1)
