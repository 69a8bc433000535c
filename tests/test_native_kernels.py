"""The native vector kernels (native/simd.hpp) at every width the build has, against the plain loops.

_native_testing.kernel_check runs un-rotate, un-rotate+dot, sum of squares, the re-rotation (move_key, also
in place) and the f16 loads and stores on the same random f16 and f32 rows, normal and NeoX pairing, several
head dims and rotated dims, at width 16 (AVX-512, when compiled in), 8 (AVX2, NEON, or plain loops) and the
plain-loop reference, which does a multiply then an add where the vector types fuse them.

Tolerances, measured over seeds 1-5 (128 rows a layout) on AVX2, then pinned at about twice the worst:
- f32 results (un-rotated keys, re-rotated f32 keys, sums of squares, dot products relative to the size of
  what they add up): a fused multiply-add skips one rounding of a product, so a vector result differs from
  the reference by a few float32 ulps at most; measured <= 2.4e-7 (2 eps), pinned at 4 eps.
- re-rotated f16 keys: the f32 results, a few ulps apart, can round to neighbouring f16 values: at most one
  f16 ulp, 2^-10 relative; measured <= 8.7e-4.
- exact: f16 loads and stores and the f16 row conversion (IEEE round to nearest even, hardware and ggml
  alike), f16 sums of squares (a product of two f16 values is exact in float32, so fusing changes nothing).
- 16-wide and 8-wide results have the same bits (one order of operations at every width).
"""

from __future__ import annotations

import pytest

from edge_runtime import _native_testing

EPS32 = 2.0**-23
F32_KERNELS = ("unrotate", "unrotate_dot_f32", "unrotate_dot_f16", "sum_squares_f32", "move_key_f32")
F16_KERNELS = ("move_key_f16", "move_key_in_place_f16")
EXACT_KERNELS = ("sum_squares_f16", "f16_load", "f16_store")
TOLERANCE = {**dict.fromkeys(F32_KERNELS, 4 * EPS32), **dict.fromkeys(F16_KERNELS, 2.0**-10),
             **dict.fromkeys(EXACT_KERNELS, 0.0)}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_every_width_matches_the_plain_loops(seed: int) -> None:
    r = _native_testing.kernel_check(seed, 128)
    print(f"seed {seed}: ISA per width {r['isa']}")
    for kernel in TOLERANCE:
        print(f"  {kernel:22s} " + "  ".join(f"{w}: abs {r['diff'][kernel][w]:.3g} rel {r['rel'][kernel][w]:.3g}"
                                             for w in r["isa"]))
    assert r["isa"]["ref"] == "scalar"
    assert r["isa"]["8"] in ("avx2", "neon", "scalar")
    assert r["isa"].get("16", "avx512") == "avx512"
    assert set(r["diff"]) - {"f16_to_f32_row_bits_differ"} == set(TOLERANCE)
    for kernel, tol in TOLERANCE.items():
        for width in r["isa"]:
            assert r["rel"][kernel][width] <= tol, (kernel, width, r["rel"][kernel][width], tol)
        assert r["diff"][kernel]["ref"] == 0.0
    assert r["diff"]["f16_to_f32_row_bits_differ"] == 0
    if "16" in r["isa"]:  # AVX-512 and AVX2 add in the one order: the same bits
        assert all(r["same_bits_as_8"][kernel]["16"] for kernel in TOLERANCE), r["same_bits_as_8"]


def test_the_reference_has_no_fused_multiply_add() -> None:
    # With plain loops as the 8-wide type (no AVX2/NEON build) width 8 is the reference itself.
    r = _native_testing.kernel_check(7, 16)
    if r["isa"]["8"] == "scalar":
        assert all(r["diff"][k]["8"] == 0.0 for k in TOLERANCE)
    else:  # the vector types fuse: the f32 kernels differ somewhere, so the check sees the vector code at all
        assert any(r["diff"][k]["8"] > 0.0 for k in F32_KERNELS)
