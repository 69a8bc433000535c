"""What training and the retention diagnostics need to know about a scene stream beyond its pixels and
questions (edge_runtime.scenes): where its object is on a patch grid. NumPy only, like the scenes."""

from __future__ import annotations

import numpy as np

from edge_runtime.scenes import Stream, shape_mask


def object_patches(stream: Stream, t: int, nx: int, ny: int) -> np.ndarray:
    """The patches (y * nx + x) of an nx x ny grid over frame t that show some of its object, ascending;
    none when no object is visible. What a compression pass should keep of the frame."""
    event = stream.event_at(t) if 0 <= t < stream.n_frames else None
    if event is None:
        return np.zeros(0, np.int64)
    mask = shape_mask(event.obj.kind, event.size)  # the sprite's silhouette, as Stream.frame pastes it
    cx, cy = event.position(t)
    h, w = mask.shape
    covered = np.zeros((stream.size, stream.size), bool)
    covered[cy - h // 2:cy - h // 2 + h, cx - w // 2:cx - w // 2 + w] = mask
    cells = covered.reshape(ny, stream.size // ny, nx, stream.size // nx).any(axis=(1, 3))
    return np.flatnonzero(cells)
