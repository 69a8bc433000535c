"""Hand-built checks of the InfiniPot-V test oracle (tests/reference_infinipot_v.py) and its RoPE helper.

Each case is small enough that its answer can be stated without running the oracle; random cases are
checked against plain-loop reimplementations of the same formulas.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.typing import NDArray
from reference_infinipot_v import (
    pool_kernel,
    recent_slot_table,
    rope_rotate,
    select_tokens,
    tar_scores,
    tie_safe_topk,
    van_scores,
)

# ---------------------------------------------------------------------------------------------------------
# Builders


def layout(frames: Sequence[int], n_patches: int, missing: Sequence[tuple[int, int]] = ()) -> tuple[
    NDArray[np.int64], NDArray[np.int64]
]:
    """frame and patch of one head's slots, frame-major then patch order, without the (frame, patch) pairs
    in `missing`."""
    pairs = [(t, q) for t in frames for q in range(n_patches) if (t, q) not in set(missing)]
    return np.array([t for t, _ in pairs], dtype=np.int64), np.array([q for _, q in pairs], dtype=np.int64)


def lh(a: NDArray, n_layers: int = 1, n_heads: int = 1) -> NDArray:
    """One head's array [N, ...] copied to every (layer, head): [L, H, N, ...]."""
    return np.broadcast_to(a, (n_layers, n_heads, *a.shape)).copy()


def unit_values(n: int, norms: dict[int, float] | None = None, dim: int = 4) -> NDArray[np.float64]:
    """Values [n, dim] of norm 1 along the first axis, except the slots given in `norms`."""
    v = np.zeros((n, dim))
    v[:, 0] = 1.0
    for slot, norm in (norms or {}).items():
        v[slot, 0] = norm
    return v


def static_keys(frame: NDArray[np.int64], patch: NDArray[np.int64], n_patches: int, dim: int = 8,
                changed: Sequence[int] = ()) -> NDArray[np.float64]:
    """Keys of a static scene: patch q has the key (q + 1) e_q in every frame, except the slots in `changed`,
    whose key is negated. Norms are exact integers, so every cosine is exactly 1, 0 or -1 and equal scores
    really are equal (with generic vectors, cos(a, a) rounds differently per vector)."""
    assert dim >= n_patches
    k = np.zeros((len(patch), dim))
    k[np.arange(len(patch)), patch] = patch + 1.0
    k[list(changed)] *= -1.0
    return k


def random_case(n_layers: int, n_heads: int, grid: tuple[int, int], n_frames: int, n_recent: int,
                n_past_kept: int, seed: int, dim: int = 8) -> dict:
    """Random memory: each head holds the r recent frames whole plus its own random subset of n_past_kept
    past tokens, in its own random slot order (slots of different heads hold different tokens)."""
    rng = np.random.default_rng(seed)
    p = grid[0] * grid[1]
    recent = list(range(n_frames - n_recent, n_frames))
    n = n_recent * p + n_past_kept
    frame = np.empty((n_layers, n_heads, n), dtype=np.int64)
    patch = np.empty_like(frame)
    for layer in range(n_layers):
        for head in range(n_heads):
            past = rng.choice((n_frames - n_recent) * p, size=n_past_kept, replace=False)
            tokens = np.concatenate([past, np.arange((n_frames - n_recent) * p, n_frames * p)])
            tokens = rng.permutation(tokens)
            frame[layer, head], patch[layer, head] = tokens // p, tokens % p
    return {
        "keys": rng.standard_normal((n_layers, n_heads, n, dim)),
        "values": rng.standard_normal((n_layers, n_heads, n, dim)),
        "frame": frame,
        "patch": patch,
        "grid": grid,
        "recent_frames": recent,
    }


# ---------------------------------------------------------------------------------------------------------
# Plain-loop reimplementations, for random cross-checks


def naive_tar(keys: NDArray, frame: NDArray, patch: NDArray, recent: Sequence[int], slot: int) -> float:
    total = 0.0
    for t in recent:
        (m,) = [j for j in range(len(frame)) if frame[j] == t and patch[j] == patch[slot]]
        a, b = keys[slot], keys[m]
        total += float(a @ b) / max(math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)), 1e-12)
    return -total / len(recent)


def naive_van(values: NDArray, frame: NDArray, patch: NDArray, nx: int, kernel: int, slot: int) -> float:
    half = kernel // 2
    x, y = patch[slot] % nx, patch[slot] // nx
    norms = [
        math.sqrt(float(values[m] @ values[m]))
        for m in range(len(frame))
        if frame[m] == frame[slot] and abs(patch[m] % nx - x) <= half and abs(patch[m] // nx - y) <= half
    ]
    return sum(norms) / len(norms)


def naive_top(scores: dict[int, float], k: int) -> list[int]:
    return [slot for slot, _ in sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:k]]


# ---------------------------------------------------------------------------------------------------------
# tie_safe_topk and the pooling schedule


def test_topk_highest_first_ties_to_lower_index() -> None:
    assert tie_safe_topk([1.0, 3.0, 3.0, 2.0, 3.0], 3).tolist() == [1, 2, 4]
    assert tie_safe_topk([1.0, 3.0, 3.0, 2.0, 3.0], 4).tolist() == [1, 2, 4, 3]
    assert tie_safe_topk([0.0, np.inf, -1.0, np.inf], 3).tolist() == [1, 3, 0]
    assert tie_safe_topk([-0.0, 0.0, -0.0], 3).tolist() == [0, 1, 2]  # -0.0 == 0.0
    assert tie_safe_topk([5.0], 0).tolist() == []
    with pytest.raises(ValueError):
        tie_safe_topk([1.0, np.nan], 1)
    with pytest.raises(ValueError):
        tie_safe_topk([1.0, 2.0], 3)


def test_pool_kernel_schedule_uses_real_fractions() -> None:
    assert [pool_kernel(layer, 4) for layer in range(4)] == [7, 5, 3, 1]
    # L = 6: L/4 = 1.5, L/2 = 3, 3L/4 = 4.5 (flooring L/4 to 1 would give layer 1 a 5).
    assert [pool_kernel(layer, 6) for layer in range(6)] == [7, 7, 5, 3, 3, 1]
    assert [pool_kernel(layer, 8) for layer in range(8)] == [7, 7, 5, 5, 3, 3, 1, 1]
    assert [pool_kernel(layer, 2) for layer in range(2)] == [7, 3]  # 1 < 2/2 is false, 1 < 1.5 is true
    assert pool_kernel(0, 1) == 7


# ---------------------------------------------------------------------------------------------------------
# Scores against plain loops


def test_tar_and_van_scores_match_plain_loops() -> None:
    case = random_case(4, 2, (3, 2), n_frames=6, n_recent=2, n_past_kept=11, seed=1)
    nx = case["grid"][0]
    for layer in range(4):
        for head in range(2):
            k, v = case["keys"][layer, head], case["values"][layer, head]
            fr, pa = case["frame"][layer, head], case["patch"][layer, head]
            table = recent_slot_table(fr, pa, case["recent_frames"], 6)
            past = np.flatnonzero(~np.isin(fr, case["recent_frames"]))
            expected = [naive_tar(k, fr, pa, case["recent_frames"], int(s)) for s in past]
            np.testing.assert_allclose(tar_scores(k, pa, table, past), expected, rtol=1e-12, atol=1e-14)
            for kernel in (1, 3, 5, 7):
                expected = [naive_van(v, fr, pa, nx, kernel, s) for s in range(len(fr))]
                np.testing.assert_allclose(van_scores(v, fr, pa, nx, kernel), expected, rtol=1e-12)


def test_cosine_of_zero_key_is_zero_not_nan() -> None:
    frame, patch = layout([0, 1], 2)
    keys = np.ones((4, 3))
    keys[0] = 0.0
    table = recent_slot_table(frame, patch, [1], 2)
    assert tar_scores(keys, patch, table, np.array([0, 1])).tolist() == pytest.approx([0.0, -1.0], abs=1e-15)


@pytest.mark.parametrize("pool", [False, True])
@pytest.mark.parametrize(("use_tar", "use_van"), [(True, True), (True, False), (False, True)])
def test_selection_matches_plain_loops(pool: bool, use_tar: bool, use_van: bool) -> None:
    case = random_case(4, 2, (3, 2), n_frames=7, n_recent=2, n_past_kept=20, seed=2)
    keep, alpha, rp = 24, 0.75, 12
    got = select_tokens(**case, keep=keep, alpha=alpha, pool=pool, use_tar=use_tar, use_van=use_van)
    for layer in range(4):
        kernel = pool_kernel(layer, 4) if pool else 1
        for head in range(2):
            k, v = case["keys"][layer, head], case["values"][layer, head]
            fr, pa = case["frame"][layer, head], case["patch"][layer, head]
            recent = [s for s in range(len(fr)) if fr[s] in case["recent_frames"]]
            past = [s for s in range(len(fr)) if fr[s] not in case["recent_frames"]]
            tar = {s: naive_tar(k, fr, pa, case["recent_frames"], s) for s in past}
            van = {s: naive_van(v, fr, pa, 3, kernel, s) for s in range(len(fr))}
            if use_tar and use_van:
                protected = set(recent) | set(naive_top(tar, math.floor(alpha * keep) - rp))
                expected = naive_top({s: math.inf if s in protected else van[s] for s in van}, keep)
            elif use_tar:
                expected = recent + naive_top(tar, keep - rp)
            else:
                expected = recent + naive_top({s: van[s] for s in past}, keep - rp)
            assert got[layer, head].tolist() == sorted(expected)


def test_selection_with_many_ties_matches_plain_loops() -> None:
    """Small-integer values: many exactly equal norms, so the tie order decides most of the selection."""
    case = random_case(2, 2, (2, 2), n_frames=8, n_recent=1, n_past_kept=20, seed=3)
    rng = np.random.default_rng(3)
    case["values"] = rng.integers(-1, 2, size=case["values"].shape).astype(np.float64)
    got = select_tokens(**case, keep=12, use_tar=False)
    for layer in range(2):
        for head in range(2):
            fr, v = case["frame"][layer, head], case["values"][layer, head]
            recent = [s for s in range(len(fr)) if fr[s] == 7]
            van = {s: math.sqrt(float(v[s] @ v[s])) for s in range(len(fr)) if fr[s] != 7}
            assert got[layer, head].tolist() == sorted(recent + naive_top(van, 12 - 4))


# ---------------------------------------------------------------------------------------------------------
# Hand-built selections


def test_tar_keeps_the_one_past_patch_that_changed() -> None:
    """Static scene, 2x2 grid, frames 0-3, recent frame 3: only frame 1 patch 3 (slot 7) ever changed."""
    frame, patch = layout([0, 1, 2, 3], 4)
    keys = lh(static_keys(frame, patch, 4, changed=[7]))
    values = lh(unit_values(16))
    common = {"keys": keys, "values": values, "frame": lh(frame), "patch": lh(patch), "grid": (2, 2),
              "recent_frames": [3], "keep": 5}
    assert select_tokens(**common, use_van=False)[0, 0].tolist() == [7, 12, 13, 14, 15]
    assert select_tokens(**common, alpha=1.0)[0, 0].tolist() == [7, 12, 13, 14, 15]
    # Two recent frames (2, 3): the change at frame 0 patch 3 (slot 3) is averaged over both.
    keys = lh(static_keys(frame, patch, 4, changed=[3]))
    got = select_tokens(keys, values, lh(frame), lh(patch), (2, 2), [2, 3], keep=9, use_van=False)
    assert got[0, 0].tolist() == [3, *range(8, 16)]


def test_tar_ties_in_a_static_scene_go_to_the_lowest_slot() -> None:
    frame, patch = layout([0, 1, 2, 3], 4)
    keys = lh(static_keys(frame, patch, 4, changed=[7]))
    got = select_tokens(keys, lh(unit_values(16)), lh(frame), lh(patch), (2, 2), [3], keep=7, use_van=False)
    assert got[0, 0].tolist() == [0, 1, 7, 12, 13, 14, 15]  # all other past slots have cos 1 with now


def test_van_keeps_the_large_norm_token() -> None:
    frame, patch = layout([0, 1, 2, 3], 4)
    keys = lh(static_keys(frame, patch, 4))
    values = lh(unit_values(16, {5: 10.0, 9: 0.5}))
    got = select_tokens(keys, values, lh(frame), lh(patch), (2, 2), [3], keep=5, use_tar=False)
    assert got[0, 0].tolist() == [5, 12, 13, 14, 15]
    # The recent frames are kept even when their values are tiny.
    values = lh(unit_values(16, {5: 10.0, 12: 1e-6, 13: 0.0, 14: 0.0, 15: 0.0}))
    got = select_tokens(keys, values, lh(frame), lh(patch), (2, 2), [3], keep=5, use_tar=False)
    assert got[0, 0].tolist() == [5, 12, 13, 14, 15]


def test_full_method_splits_the_budget_between_tar_and_van() -> None:
    """2x1 grid, frames 0-4, recent frame 4 (slots 8, 9). Slot 2 is the only past key that changed (top TaR)
    but has a tiny value; slot 6 has the largest value norm, slot 4 the next."""
    frame, patch = layout([0, 1, 2, 3, 4], 2)
    keys = lh(static_keys(frame, patch, 2, changed=[2]))
    values = lh(unit_values(10, {2: 0.1, 4: 3.0, 6: 5.0}))
    args = (keys, values, lh(frame), lh(patch), (2, 1), [4])
    # floor(0.75 * 4) - 2 = 1 TaR slot (slot 2), then the best VaN of the rest (slot 6).
    assert select_tokens(*args, keep=4, alpha=0.75)[0, 0].tolist() == [2, 6, 8, 9]
    # TaR only: slot 2, then a tie between all the static past slots -> slot 0.
    assert select_tokens(*args, keep=4, use_van=False)[0, 0].tolist() == [0, 2, 8, 9]
    assert select_tokens(*args, keep=4, use_tar=False)[0, 0].tolist() == [4, 6, 8, 9]
    # alpha = 0.5: floor(2) - 2 = 0 TaR slots, so the full method is VaN only.
    assert select_tokens(*args, keep=4, alpha=0.5)[0, 0].tolist() == [4, 6, 8, 9]
    # alpha = 1: everything is protected by TaR, so the full method is TaR only.
    assert select_tokens(*args, keep=4, alpha=1.0)[0, 0].tolist() == [0, 2, 8, 9]
    # floor(0.99 * 5) - 2 = 2 TaR slots (2 and the tie winner 0), then the best VaN (6).
    assert select_tokens(*args, keep=5, alpha=0.99)[0, 0].tolist() == [0, 2, 6, 8, 9]


@pytest.mark.parametrize("pool", [False, True])
def test_alpha_one_is_tar_only_and_alpha_at_recent_share_is_van_only(pool: bool) -> None:
    case = random_case(4, 2, (3, 2), n_frames=8, n_recent=2, n_past_kept=30, seed=4)
    rp = 12
    keep = 24
    tar_only = select_tokens(**case, keep=keep, pool=pool, use_van=False)
    van_only = select_tokens(**case, keep=keep, pool=pool, use_tar=False)
    assert not np.array_equal(tar_only, van_only)
    np.testing.assert_array_equal(select_tokens(**case, keep=keep, alpha=1.0, pool=pool), tar_only)
    assert math.floor(0.5 * keep) == rp  # n_tar == 0
    np.testing.assert_array_equal(select_tokens(**case, keep=keep, alpha=0.5, pool=pool), van_only)


def test_recent_frames_always_kept_and_output_well_formed() -> None:
    case = random_case(4, 2, (3, 2), n_frames=8, n_recent=2, n_past_kept=30, seed=5)
    n = case["frame"].shape[-1]
    for keep, alpha, pool, flags in [
        (12, 1.0, False, (True, True)),
        (20, 0.6, True, (True, True)),
        (30, 0.5, False, (True, True)),
        (12, 0.5, True, (False, True)),
        (25, 0.5, True, (True, False)),
    ]:
        got = select_tokens(**case, keep=keep, alpha=alpha, pool=pool, use_tar=flags[0], use_van=flags[1])
        assert got.shape == (4, 2, keep) and got.dtype == np.int64
        for layer in range(4):
            for head in range(2):
                kept = got[layer, head]
                assert np.all(np.diff(kept) > 0) and kept[0] >= 0 and kept[-1] < n
                recent = np.flatnonzero(np.isin(case["frame"][layer, head], case["recent_frames"]))
                assert set(recent.tolist()) <= set(kept.tolist())


def test_keep_equal_to_n_keeps_everything() -> None:
    case = random_case(2, 2, (2, 2), n_frames=4, n_recent=1, n_past_kept=5, seed=6)
    got = select_tokens(**case, keep=9, alpha=0.5)
    np.testing.assert_array_equal(got, np.broadcast_to(np.arange(9), (2, 2, 9)))


def test_ties_everywhere_keep_the_lowest_past_slots() -> None:
    """All keys equal and all values equal: recent frame slots plus the lowest-index past slots. The recent
    frame sits in the middle of the slot order, so 'lowest' must skip it."""
    frame = np.array([0, 0, 2, 2, 2, 2, 1, 1, 0, 0, 1, 1])
    patch = np.array([0, 1, 3, 2, 1, 0, 0, 1, 2, 3, 2, 3])
    keys, values = lh(np.ones((12, 4))), lh(np.ones((12, 4)))
    args = (keys, values, lh(frame), lh(patch), (2, 2), [2])
    expected = [0, 1, 2, 3, 4, 5, 6]
    assert select_tokens(*args, keep=7, alpha=0.75)[0, 0].tolist() == expected  # 1 TaR, 2 VaN
    assert select_tokens(*args, keep=7, use_tar=False)[0, 0].tolist() == expected
    assert select_tokens(*args, keep=7, use_van=False)[0, 0].tolist() == expected
    assert select_tokens(*args, keep=7, alpha=0.75, pool=True)[0, 0].tolist() == expected


def test_pooled_van_means_over_the_existing_neighbours_of_the_same_frame() -> None:
    """3x3 grid, frame 0 past, frame 1 recent with huge norms (must not leak into frame 0)."""
    frame, patch = layout([0, 1], 9)
    values = unit_values(18, {4: 10.0, **{s: 100.0 for s in range(9, 18)}})
    k3 = van_scores(values, frame, patch, 3, 3)
    # Corners see 4 patches, edges 6, the centre all 9; the spike of 10 sits at the centre.
    assert k3[:9].tolist() == pytest.approx([13 / 4, 15 / 6, 13 / 4, 15 / 6, 18 / 9, 15 / 6, 13 / 4, 15 / 6, 13 / 4])
    assert k3[9:].tolist() == pytest.approx([100.0] * 9)
    assert van_scores(values, frame, patch, 3, 5)[:9].tolist() == pytest.approx([2.0] * 9)
    assert van_scores(values, frame, patch, 3, 1)[:9].tolist() == [1, 1, 1, 1, 10, 1, 1, 1, 1]
    # Patch 1 of frame 0 evicted: patch 0 now sees 0, 3, 4 only; patch 2 sees 2, 4, 5.
    frame, patch = layout([0, 1], 9, missing=[(0, 1)])
    values = unit_values(17, {3: 10.0, **{s: 100.0 for s in range(8, 17)}})  # slot 3 is patch 4 now
    k3 = van_scores(values, frame, patch, 3, 3)
    assert k3[0] == pytest.approx(12 / 3)
    assert k3[1] == pytest.approx(12 / 3)
    assert k3[3] == pytest.approx(17 / 8)  # the centre: 8 patches left


def test_pooling_kernel_changes_the_pick_per_layer() -> None:
    """3x3 grid, past frame 0 (slots 0-8), recent frame 1. Spike 10 at the centre (slot 4), 3 at the bottom
    right corner (slot 8), the rest 1. Layers of L = 4: kernel 7 and 5 cover the whole frame, so every past
    slot ties (lowest wins, slot 0); kernel 3 makes slot 8 best ((3 + 1 + 1 + 10) / 4 = 3.75); kernel 1 is the
    raw norm (slot 4)."""
    frame, patch = layout([0, 1], 9)
    values = lh(unit_values(18, {4: 10.0, 8: 3.0}), n_layers=4)
    keys = lh(np.ones((18, 4)), n_layers=4)
    got = select_tokens(keys, values, lh(frame, 4), lh(patch, 4), (3, 3), [1], keep=10, pool=True, use_tar=False)
    assert [int(np.setdiff1d(got[layer, 0], np.arange(9, 18))[0]) for layer in range(4)] == [0, 0, 8, 4]
    unpooled = select_tokens(keys, values, lh(frame, 4), lh(patch, 4), (3, 3), [1], keep=10, use_tar=False)
    assert [int(np.setdiff1d(unpooled[layer, 0], np.arange(9, 18))[0]) for layer in range(4)] == [4, 4, 4, 4]


def test_heads_and_layers_choose_independently() -> None:
    frame, patch = layout([0, 1, 2, 3], 4)
    values = lh(unit_values(16), n_layers=2, n_heads=2)
    values[0, 0, 5, 0] = 10.0
    values[0, 1, 6, 0] = 10.0
    values[1, 0, 1, 0] = 10.0
    values[1, 1, 2, 0] = 10.0
    keys = lh(static_keys(frame, patch, 4), n_layers=2, n_heads=2)
    got = select_tokens(keys, values, lh(frame, 2, 2), lh(patch, 2, 2), (2, 2), [3], keep=5, use_tar=False)
    assert [int(got[layer, head, 0]) for layer in range(2) for head in range(2)] == [5, 6, 1, 2]

    case = random_case(4, 2, (3, 2), n_frames=8, n_recent=2, n_past_kept=30, seed=7)
    full = select_tokens(**case, keep=24, alpha=0.75, pool=True)
    for head in range(2):
        alone = {**case, **{name: case[name][:, head : head + 1] for name in ("keys", "values", "frame", "patch")}}
        np.testing.assert_array_equal(select_tokens(**alone, keep=24, alpha=0.75, pool=True), full[:, head : head + 1])
    # Changing head 1's memory does not move head 0's choice.
    other = {**case, "keys": case["keys"].copy(), "values": case["values"].copy()}
    other["keys"][:, 1] *= -1.0
    other["values"][:, 1] = np.random.default_rng(8).standard_normal(other["values"][:, 1].shape)
    changed = select_tokens(**other, keep=24, alpha=0.75, pool=True)
    np.testing.assert_array_equal(changed[:, 0], full[:, 0])
    assert not np.array_equal(changed[:, 1], full[:, 1])


def test_slot_order_does_not_matter_beyond_ties() -> None:
    """Head 1 holds head 0's tokens in another slot order: it keeps the same tokens."""
    case = random_case(4, 1, (3, 2), n_frames=8, n_recent=2, n_past_kept=30, seed=9)
    perm = np.random.default_rng(9).permutation(case["frame"].shape[-1])
    two = {
        **case,
        **{name: np.concatenate([case[name], case[name][:, :, perm]], axis=1)
           for name in ("keys", "values", "frame", "patch")},
    }
    got = select_tokens(**two, keep=24, alpha=0.75, pool=True)
    for layer in range(4):
        assert sorted(perm[got[layer, 1]].tolist()) == got[layer, 0].tolist()


def test_four_layers_two_heads_four_hundred_slots_is_fast() -> None:
    case = random_case(4, 2, (5, 4), n_frames=30, n_recent=2, n_past_kept=360, seed=10, dim=64)
    start = time.perf_counter()
    got = select_tokens(**case, keep=300, alpha=0.5, pool=True)
    assert time.perf_counter() - start < 1.0
    assert got.shape == (4, 2, 300)


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_incomplete_or_duplicated_recent_frame_is_refused() -> None:
    case = random_case(4, 2, (2, 2), n_frames=5, n_recent=2, n_past_kept=6, seed=11)
    bad = {**case, "frame": case["frame"].copy(), "patch": case["patch"].copy()}
    slot = int(np.flatnonzero(bad["frame"][2, 1] == 4)[0])
    bad["frame"][2, 1, slot] = 0  # layer 2, head 1 lost one recent token (a past token took its slot)
    with pytest.raises(ValueError, match="not held whole"):
        select_tokens(**bad, keep=12, alpha=1.0)
    with pytest.raises(ValueError, match="not held whole"):
        select_tokens(**bad, keep=14, alpha=1.0)  # checked even when everything is kept
    bad = {**case, "patch": case["patch"].copy()}
    slots = np.flatnonzero(bad["frame"][0, 0] == 3)
    bad["patch"][0, 0, slots[0]] = bad["patch"][0, 0, slots[1]]  # a patch twice, another missing
    with pytest.raises(ValueError, match="not held whole"):
        select_tokens(**bad, keep=12, alpha=1.0)


def test_budget_errors() -> None:
    case = random_case(1, 1, (2, 2), n_frames=5, n_recent=2, n_past_kept=6, seed=12)  # r p = 8, N = 14
    with pytest.raises(ValueError, match="alpha"):
        select_tokens(**case, keep=12, alpha=0.5)  # floor(6) - 8 < 0
    assert select_tokens(**case, keep=12, alpha=0.7).shape == (1, 1, 12)  # floor(8.4) - 8 = 0
    with pytest.raises(ValueError, match="alpha"):
        select_tokens(**case, keep=14, alpha=0.5)  # a bad alpha is refused even when all is kept
    with pytest.raises(ValueError, match="keep"):
        select_tokens(**case, keep=15, alpha=1.0)  # C > N
    with pytest.raises(ValueError, match="recent"):
        select_tokens(**case, keep=7, use_tar=False)  # the ablations need C >= r p
    with pytest.raises(ValueError, match="recent"):
        select_tokens(**case, keep=7, use_van=False)
    assert select_tokens(**case, keep=8, use_van=False)[0, 0].tolist() == sorted(
        np.flatnonzero(case["frame"][0, 0] >= 3).tolist()
    )


def test_malformed_input_errors() -> None:
    case = random_case(1, 1, (2, 2), n_frames=5, n_recent=2, n_past_kept=6, seed=13)
    with pytest.raises(ValueError, match="alpha"):
        select_tokens(**case, keep=12, alpha=1.5)
    with pytest.raises(ValueError, match="use_tar"):
        select_tokens(**case, keep=12, use_tar=False, use_van=False)
    with pytest.raises(ValueError, match="duplicates"):
        select_tokens(**{**case, "recent_frames": [4, 4]}, keep=12)
    with pytest.raises(ValueError, match="recent frame"):
        select_tokens(**{**case, "recent_frames": []}, keep=12)
    with pytest.raises(ValueError, match="patch"):
        select_tokens(**{**case, "patch": case["patch"] + 4}, keep=12)
    keys = case["keys"].copy()
    keys[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        select_tokens(**{**case, "keys": keys}, keep=12)
    # VaN only needs no recent frame at all.
    assert select_tokens(**{**case, "recent_frames": []}, keep=3, use_tar=False).shape == (1, 1, 3)


# ---------------------------------------------------------------------------------------------------------
# RoPE


@pytest.mark.parametrize("neox", [False, True])
def test_rope_inverse_norm_and_relative_position(neox: bool) -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((3, 7, 16))  # [H, N, D]
    pos = rng.integers(-50, 5000, size=7)
    y = rope_rotate(x, pos, 10000.0, 16, neox)
    np.testing.assert_allclose(rope_rotate(y, -pos, 10000.0, 16, neox), x, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-12)
    q, k = rng.standard_normal(16), rng.standard_normal(16)
    for p1, p2, shift in [(10, 3, 100), (0, 17, -40), (4096, 1, 7)]:
        a = rope_rotate(q[None], [p1], 500000.0, 16, neox)[0] @ rope_rotate(k[None], [p2], 500000.0, 16, neox)[0]
        b = rope_rotate(q[None], [p1 + shift], 500000.0, 16, neox)[0] @ rope_rotate(
            k[None], [p2 + shift], 500000.0, 16, neox
        )[0]
        assert a == pytest.approx(b, rel=1e-9, abs=1e-9)
    # Position 0 is the identity; dims >= n_rot are never touched.
    np.testing.assert_array_equal(rope_rotate(x, np.zeros(7, dtype=int), 10000.0, 16, neox), x)
    partial = rope_rotate(x, pos, 10000.0, 8, neox)
    np.testing.assert_array_equal(partial[..., 8:], x[..., 8:])
    assert not np.allclose(partial[..., :8], x[..., :8])


def test_rope_pairs_by_mode() -> None:
    c1, s1, c2, s2 = math.cos(1.0), math.sin(1.0), math.cos(0.01), math.sin(0.01)
    # theta_0 = 1, theta_1 = 1 * 10000 ** (-2 / 4) = 0.01.
    normal = rope_rotate(np.array([[1.0, 0.0, 1.0, 0.0]]), [1], 10000.0, 4, neox=False)[0]
    np.testing.assert_allclose(normal, [c1, s1, c2, s2], rtol=1e-15)
    neox = rope_rotate(np.array([[1.0, 1.0, 0.0, 0.0]]), [1], 10000.0, 4, neox=True)[0]
    np.testing.assert_allclose(neox, [c1, c2, s1, s2], rtol=1e-15)
    b = rope_rotate(np.array([[0.0, 1.0, 0.0, 0.0]]), [1], 10000.0, 4, neox=False)[0]
    np.testing.assert_allclose(b, [-s1, c1, 0.0, 0.0], atol=1e-15)
    # NeoX on halves = normal on interleaved pairs, under the permutation that splits evens and odds.
    x = np.random.default_rng(15).standard_normal((5, 12))
    pos = np.arange(5) * 37 - 20
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2), np.arange(8, 12)])
    np.testing.assert_allclose(
        rope_rotate(x[:, perm], pos, 10000.0, 8, neox=True), rope_rotate(x, pos, 10000.0, 8, neox=False)[:, perm],
        rtol=1e-13, atol=1e-13,
    )
    with pytest.raises(ValueError):
        rope_rotate(x, pos, 10000.0, 7, neox=False)
    with pytest.raises(ValueError):
        rope_rotate(x, pos, 10000.0, 14, neox=False)
