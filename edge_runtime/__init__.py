"""edge-runtime: streaming video understanding on small devices, in a KV memory that does not grow."""

from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel
from edge_runtime.session import Answer, FrameRecord, Session, SessionConfig, Status

__all__ = ["Answer", "FrameRecord", "ModelConfig", "ModelError", "Session", "SessionConfig", "Status",
           "VisionLanguageModel"]
__version__ = "0.1.0"
