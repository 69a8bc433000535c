"""Test oracle for InfiniPot-V token selection, written from the method's text, not from the native code.

InfiniPot-V (Kim, Shim, Choi, Chang, "InfiniPot-V: Memory-Constrained KV Cache Compression for Streaming
Video Understanding", https://arxiv.org/abs/2506.15745) shrinks a video KV cache to a fixed budget with two
query-agnostic scores, computed separately for every (layer, KV head):

- TaR (temporal-axis redundancy), on keys: minus the mean cosine similarity between a past token's key and
  the keys of the same patch in the r most recent frames. High means "unlike what the camera sees now".
- VaN (value norm): the L2 norm of the token's value vector, optionally average-pooled over the frame's
  patch grid with a kernel that shrinks with depth (7, 5, 3, then 1 in the last quarter of layers).

The recent frames are always kept whole; floor(alpha * C) tokens (the recent ones included) are protected
by TaR, and the rest of the budget C goes to the highest VaN. This module is a plain NumPy reference of one
compression pass, in float64, used only by the tests to check that the native (C++) implementation selects
exactly the same slots. Ties are part of the contract: equal scores go to the lower slot index first.

`rope_rotate` is llama.cpp's rotary embedding (normal and NeoX layouts) in float64, so the tests can
rotate and un-rotate keys the way the native code must.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "COS_EPS",
    "pool_kernel",
    "recent_slot_table",
    "rope_rotate",
    "select_tokens",
    "tar_scores",
    "tie_safe_topk",
    "van_scores",
]

COS_EPS = 1e-12
"""cos(a, b) = a.b / max(|a| |b|, COS_EPS)."""


def tie_safe_topk(scores: ArrayLike, k: int) -> NDArray[np.int64]:
    """Indices of the k highest scores, highest first; equal scores go to the lower index first.

    +inf is allowed (it is the "protected" score); NaN is refused, since it has no place in an order.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if not 0 <= k <= s.size:
        raise ValueError(f"k={k} outside [0, {s.size}]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    # np.lexsort sorts by the last key first: descending score, then ascending index.
    order = np.lexsort((np.arange(s.size), -s))
    return order[:k].astype(np.int64)


def pool_kernel(layer: int, n_layers: int) -> int:
    """VaN pooling kernel of a layer: 7 if l < L/4, 5 if l < L/2, 3 if l < 3L/4, else 1 (L/4 not floored)."""
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer {layer} outside [0, {n_layers})")
    # Real-number comparisons done exactly in integers: l < L/4  <=>  4l < L, and so on.
    if 4 * layer < n_layers:
        return 7
    if 2 * layer < n_layers:
        return 5
    if 4 * layer < 3 * n_layers:
        return 3
    return 1


def recent_slot_table(
    frame: NDArray[np.integer], patch: NDArray[np.integer], recent_frames: Sequence[int], n_patches: int
) -> NDArray[np.int64]:
    """For one (layer, head): table[i, q] = the slot holding recent frame recent_frames[i], patch q.

    Raises ValueError unless each recent frame is held whole, every patch exactly once.
    """
    table = np.empty((len(recent_frames), n_patches), dtype=np.int64)
    for i, t in enumerate(recent_frames):
        slots = np.flatnonzero(frame == t)
        patches = patch[slots]
        if slots.size != n_patches or not np.array_equal(np.sort(patches), np.arange(n_patches)):
            raise ValueError(
                f"recent frame {t} is not held whole: {slots.size} slots with patches "
                f"{sorted(patches.tolist())}, expected each of the {n_patches} patches once"
            )
        table[i, patches] = slots
    return table


def tar_scores(keys: NDArray[np.floating], patch: NDArray[np.integer], table: NDArray[np.int64],
               slots: NDArray[np.int64]) -> NDArray[np.float64]:
    """TaR scores of the given (past) slots of one (layer, head).

    s_tar(n) = -(1/r) * sum over recent frames t' of cos(K[n], K[m(t', patch(n))]), with keys [N, D] and
    table the [r, p] slot table of `recent_slot_table`.
    """
    k = np.asarray(keys, dtype=np.float64)
    r = table.shape[0]
    if r == 0:
        raise ValueError("TaR needs at least one recent frame")
    norms = np.sqrt(np.sum(k * k, axis=1))  # [N]
    partners = table[:, patch[slots]]  # [r, M]: the same patch in each recent frame
    dots = np.einsum("md,rmd->rm", k[slots], k[partners])  # [r, M]
    cos = dots / np.maximum(norms[slots][None, :] * norms[partners], COS_EPS)
    return -(1.0 / r) * np.sum(cos, axis=0)


def van_scores(values: NDArray[np.floating], frame: NDArray[np.integer], patch: NDArray[np.integer],
               nx: int, kernel: int) -> NDArray[np.float64]:
    """VaN scores of all N slots of one (layer, head): the L2 norm of each value vector [N, Dv].

    With kernel k > 1, each score becomes the mean of the norms of the slots of this head in the same frame
    whose patch lies within k//2 in both x and y (a slot always counts itself; missing patches do not count).
    """
    v = np.asarray(values, dtype=np.float64)
    norm = np.sqrt(np.sum(v * v, axis=1))
    if kernel <= 1:
        return norm
    half = kernel // 2
    x, y = patch % nx, patch // nx
    window = (
        (frame[:, None] == frame[None, :])
        & (np.abs(x[:, None] - x[None, :]) <= half)
        & (np.abs(y[:, None] - y[None, :]) <= half)
    )  # [N, N], window[n, m]: slot m pools into slot n
    return (window @ norm) / np.sum(window, axis=1)


def select_tokens(
    keys: ArrayLike,
    values: ArrayLike,
    frame: ArrayLike,
    patch: ArrayLike,
    grid: tuple[int, int],
    recent_frames: Sequence[int],
    keep: int,
    alpha: float = 0.5,
    pool: bool = False,
    use_tar: bool = True,
    use_van: bool = True,
) -> NDArray[np.int64]:
    """One InfiniPot-V compression pass: the slots each (layer, head) keeps, [L, H, keep], sorted ascending.

    keys [L, H, N, D] (RoPE already undone), values [L, H, N, Dv], frame and patch [L, H, N] (patch =
    y * nx + x), grid = (nx, ny), recent_frames = ids of the r most recent frames (each must be held whole
    by every head). Full method when use_tar and use_van; TaR-only or VaN-only ablations otherwise (alpha
    is then unused). Raises ValueError on malformed input, keep > N, or a budget that cannot hold the
    recent frames (floor(alpha * keep) < r * p for the full method, keep < r * p for the ablations).
    """
    k_all = np.asarray(keys, dtype=np.float64)
    v_all = np.asarray(values, dtype=np.float64)
    frame_all = np.asarray(frame)
    patch_all = np.asarray(patch)
    if k_all.ndim != 4 or v_all.ndim != 4:
        raise ValueError(f"keys and values must be [L, H, N, D], got {k_all.shape} and {v_all.shape}")
    n_layers, n_heads, n_slots, _ = k_all.shape
    if v_all.shape[:3] != k_all.shape[:3]:
        raise ValueError(f"values {v_all.shape} do not match keys {k_all.shape}")
    if frame_all.shape != k_all.shape[:3] or patch_all.shape != k_all.shape[:3]:
        raise ValueError(f"frame {frame_all.shape} and patch {patch_all.shape} must be {k_all.shape[:3]}")
    if not (np.issubdtype(frame_all.dtype, np.integer) and np.issubdtype(patch_all.dtype, np.integer)):
        raise ValueError("frame and patch must be integer arrays")
    if not (np.isfinite(k_all).all() and np.isfinite(v_all).all()):
        raise ValueError("keys and values must be finite")
    nx, ny = (int(g) for g in grid)
    if nx < 1 or ny < 1:
        raise ValueError(f"grid {grid} must be positive")
    n_patches = nx * ny
    if patch_all.size and (patch_all.min() < 0 or patch_all.max() >= n_patches):
        raise ValueError(f"patch indices must lie in [0, {n_patches})")
    recent = [int(t) for t in recent_frames]
    if len(set(recent)) != len(recent):
        raise ValueError(f"recent_frames has duplicates: {recent}")
    r = len(recent)
    n_recent = r * n_patches
    if not (use_tar or use_van):
        raise ValueError("at least one of use_tar, use_van must be on")
    if use_tar and r == 0:
        raise ValueError("TaR needs at least one recent frame")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} outside [0, 1]")
    if not 0 <= keep <= n_slots:
        raise ValueError(f"keep={keep} outside [0, N={n_slots}]")
    n_tar = math.floor(alpha * keep) - n_recent  # used by the full method only
    if use_tar and use_van and n_tar < 0:
        raise ValueError(
            f"alpha * |C| must cover the recent frames: floor({alpha} * {keep}) < {r} * {n_patches}"
        )
    if keep < n_recent:
        raise ValueError(f"keep={keep} cannot hold the {r} recent frames ({n_recent} tokens)")

    out = np.empty((n_layers, n_heads, keep), dtype=np.int64)
    for layer in range(n_layers):
        kernel = pool_kernel(layer, n_layers) if pool else 1
        for head in range(n_heads):
            fr, pa = frame_all[layer, head], patch_all[layer, head]
            table = recent_slot_table(fr, pa, recent, n_patches)  # checks the recent frames first
            if keep == n_slots:
                out[layer, head] = np.arange(n_slots)
                continue
            is_recent = np.isin(fr, recent)
            past = np.flatnonzero(~is_recent)  # ascending, so ties by position = ties by slot index
            tar = np.full(n_slots, np.nan)
            if use_tar:
                tar[past] = tar_scores(k_all[layer, head], pa, table, past)
            van = van_scores(v_all[layer, head], fr, pa, nx, kernel) if use_van else np.full(n_slots, np.nan)
            out[layer, head] = choose_from_scores(tar, van, is_recent, keep, alpha, use_tar, use_van)
    return out


def choose_from_scores(tar: NDArray[np.floating], van: NDArray[np.floating], is_recent: NDArray[np.bool_], keep: int,
                       alpha: float, use_tar: bool, use_van: bool) -> NDArray[np.int64]:
    """One (layer, head)'s choice from its scores [N] (TaR of the past slots, NaN on the recent ones; VaN of
    all): the recent slots, then the floor(alpha * keep) - n_recent best TaR of the past, then the best VaN
    of the rest (the full method); an ablation fills the budget from its one score. Sorted ascending."""
    n_slots, past = is_recent.size, np.flatnonzero(~is_recent)
    if keep == n_slots:
        return np.arange(n_slots)
    n_recent = int(is_recent.sum())
    if use_tar and use_van:
        protected = is_recent.copy()
        protected[past[tie_safe_topk(tar[past], math.floor(alpha * keep) - n_recent)]] = True
        final = np.where(protected, np.inf, van)
        kept = tie_safe_topk(final, keep)
    else:
        s_past = tar[past] if use_tar else van[past]
        kept = np.concatenate([np.flatnonzero(is_recent), past[tie_safe_topk(s_past, keep - n_recent)]])
    return np.sort(kept)


def rope_rotate(
    x: ArrayLike, positions: ArrayLike, freq_base: float, n_rot: int, neox: bool
) -> NDArray[np.float64]:
    """llama.cpp's rotary embedding of x [..., N, D] at integer positions [N] (or broadcastable to x[..., 0]).

    theta_i = pos * freq_base ** (-2 i / n_rot) for i in [0, n_rot / 2). Normal mode (LLAMA_ROPE_TYPE_NORM)
    rotates the pairs (x[2i], x[2i+1]); NeoX mode rotates (x[i], x[i + n_rot/2]); dims >= n_rot are left
    alone. (a, b) -> (a cos - b sin, a sin + b cos). Negative positions rotate back. No frequency scaling,
    YaRN or M-RoPE sections: plain RoPE only. Computed in float64 (llama.cpp uses float32, so compare
    against it with a tolerance).
    """
    v = np.array(x, dtype=np.float64)  # a copy: the result
    d = v.shape[-1]
    if n_rot % 2 or not 0 < n_rot <= d:
        raise ValueError(f"n_rot={n_rot} must be even and in (0, {d}]")
    half = n_rot // 2
    pos = np.asarray(positions, dtype=np.float64)
    inv_freq = float(freq_base) ** (-2.0 * np.arange(half) / n_rot)  # [n_rot/2]
    theta = pos[..., None] * inv_freq  # [..., N, n_rot/2]
    cos, sin = np.cos(theta), np.sin(theta)
    if neox:
        ia, ib = np.arange(half), np.arange(half) + half
    else:
        ia, ib = 2 * np.arange(half), 2 * np.arange(half) + 1
    a, b = v[..., ia].copy(), v[..., ib].copy()
    v[..., ia] = a * cos - b * sin
    v[..., ib] = a * sin + b * cos
    return v
