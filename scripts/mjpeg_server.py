"""An IP camera on loopback: MJPEG over HTTP (multipart/x-mixed-replace, as most IP cameras and phone apps
serve it), that can be stopped and started again on the same port, like a camera that drops off the network
and comes back. Used by the reconnect tests and the soak (scripts/soak.py); also by hand:

    python -m scripts.mjpeg_server --port 8081 --seed 3      # then: edge-runtime --url http://127.0.0.1:8081/
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from collections.abc import Callable

import cv2
import numpy as np

from edge_runtime.sources import SyntheticSource

BOUNDARY = b"frame"


class MjpegServer:
    """Serves frame(i) for i = 0, 1, ... at `fps` to every client, each from the server's own clock (a live
    camera: a client that connects late sees the current frame, not the first). stop() closes the port and
    every connection; start() opens the same port again."""

    def __init__(self, frame: Callable[[int], np.ndarray], fps: float = 10.0, port: int = 0) -> None:
        self.frame, self.fps, self.port = frame, fps, port
        self._t0 = time.monotonic()
        self._server: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far, over all starts

    def start(self) -> MjpegServer:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port again, right after a stop
        server.bind(("127.0.0.1", self.port))
        server.listen(8)
        self.port = server.getsockname()[1]
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
            conns, self._conns = self._conns, set()
        if server is not None:
            try:
                server.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept(); close() alone does not,
            except OSError:                        # and the port would stay in LISTEN until it returned
                pass
            server.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # the client sees the connection end now, not at a time-out
            except OSError:
                pass
            conn.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/video.mjpg"

    def __enter__(self) -> MjpegServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn = server.accept()[0]
            except OSError:  # stopped
                return
            with self._lock:
                if self._server is not server:
                    conn.close()
                    return
                self._conns.add(conn)
                self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.recv(65536)  # the request; any path will do
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=" + BOUNDARY
                         + b"\r\n\r\n")
            while True:
                i = int((time.monotonic() - self._t0) * self.fps)
                ok, jpeg = cv2.imencode(".jpg", self.frame(i))
                assert ok
                conn.sendall(b"--" + BOUNDARY + b"\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n"
                             % jpeg.size + jpeg.tobytes() + b"\r\n")
                time.sleep(max(0.0, (i + 1) / self.fps - (time.monotonic() - self._t0)))
        except OSError:  # the client left, or stop() closed the connection
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()


def synthetic_camera(seed: int, fps: float = 10.0, port: int = 0, camera_fps: float = 1.0) -> MjpegServer:
    """The synthetic world as an IP camera: scene frame k shown for 1/camera_fps seconds, at `fps` frames/s."""
    scene = SyntheticSource(seed=seed)
    return MjpegServer(lambda i: scene.frame(int(i * camera_fps / fps)), fps=fps, port=port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--seed", type=int, default=0, help="the synthetic scene to serve")
    p.add_argument("--fps", type=float, default=10.0)
    args = p.parse_args()
    with synthetic_camera(args.seed, args.fps, args.port) as server:
        print(f"serving {server.url} (Ctrl-C to stop)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
