"""edge-runtime: streaming video understanding on small devices, in a KV memory that does not grow."""

import os

# OpenCV and FFmpeg write warnings straight to stderr, past `logging`; a failed open would print three
# lines of noise above our one-line error. They read these once, before cv2 is imported; the user's
# own settings win, and --verbose turns them back on for captures opened later.
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel  # noqa: E402
from edge_runtime.session import Answer, FrameRecord, Session, SessionConfig, Status  # noqa: E402

__all__ = ["Answer", "FrameRecord", "ModelConfig", "ModelError", "Session", "SessionConfig", "Status",
           "VisionLanguageModel"]
__version__ = "0.1.0"
