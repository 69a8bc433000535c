"""llama.cpp's log: quiet by default, but its last errors are kept so a failure can say why in one line.

llama, mtmd and mtmd's helpers have separate log callbacks; one object serves all three. Keep a reference
to the ctypes callback for as long as llama.cpp may call it (it is collected otherwise).
"""

from __future__ import annotations

import ctypes
import re
import sys
import threading
from collections import deque
from types import FrameType

import llama_cpp
import llama_cpp.mtmd_cpp as mtmd


class _NativeLog:
    # ggml's levels in this version: 1 debug, 2 info, 3 warn, 4 error, 5 continues the previous line.
    LEVEL_ERROR, LEVEL_CONT = 4, 5

    def __init__(self) -> None:
        self.verbose = False
        self.errors: deque[str] = deque(maxlen=20)
        self._last_level = 0
        self._lock = threading.Lock()
        # The ctypes callback must stay referenced for as long as llama.cpp may call it.
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == self.LEVEL_CONT:
            level = self._last_level
        self._last_level = level
        message = text.decode("utf-8", errors="replace")
        if self.verbose:
            sys.stderr.write(message)
        if level == self.LEVEL_ERROR and message.strip():
            with self._lock:
                self.errors.append(message.strip().splitlines()[0])

    @classmethod
    def running_in(cls, frame: FrameType | None) -> bool:
        """Whether `frame` (or a caller of it) is this callback: an exception raised there goes nowhere, since
        ctypes only prints what a callback raises."""
        while frame is not None:
            if frame.f_code is cls._on_log.__code__:
                return True
            frame = frame.f_back
        return False

    def install(self, verbose: bool) -> None:
        self.verbose = verbose
        llama_cpp.llama_log_set(self.callback, ctypes.c_void_p(0))
        mtmd.mtmd_log_set(self.callback, ctypes.c_void_p(0))
        mtmd.mtmd_helper_log_set(self.callback, ctypes.c_void_p(0))

    def first_error(self, latest: bool = False) -> str:
        """The root cause: llama.cpp logs the first failure, then each caller's "failed" on top of it.

        While streaming nobody clears the log, so failures there ask for the `latest` line instead.
        """
        with self._lock:
            if not self.errors:
                return "llama.cpp gave no reason (rerun with --verbose)"
            message = self.errors[-1] if latest else self.errors[0]
        # Drop "function_name: " and "error: " prefixes: the user needs the reason, not the call stack.
        while re.match(r"^[A-Za-z_][\w:]*: ", message):
            message = message.split(": ", 1)[1]
        return message

    def clear(self) -> None:
        with self._lock:
            self.errors.clear()


NATIVE_LOG = _NativeLog()
