"""OpenCV (cv2), imported in this one place: where it is missing, the error is one line saying how to install it.

OpenCV has no PyPI wheel for Android: under Termux it comes from Termux's own package (README, "Android under
Termux"), and pip is told not to fetch it there. Modules that need it import it from here
(`from edge_runtime.opencv import cv2`); the CLI prints the MissingDependency (errors.py) as its one-line error.
"""

from __future__ import annotations

from edge_runtime.errors import MissingDependency

CV2_MISSING = ("OpenCV (cv2) is not installed: pip install opencv-python-headless, "
               "or on Termux: pkg install opencv-python")

try:
    import cv2
except ImportError as e:  # not installed (e.name == "cv2"), or installed without the shared libraries it needs
    raise MissingDependency(CV2_MISSING if e.name == "cv2" else f"OpenCV (cv2) is installed but does not load: {e}") \
        from e

__all__ = ["CV2_MISSING", "MissingDependency", "cv2"]
