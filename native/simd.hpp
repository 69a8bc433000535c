// The vector kernels of the pass, written once over a width-generic vector type: un-rotating a key
// (RoPE), un-rotate-and-dot, a value's sum of squares, re-rotating a key in the cache's own type
// (move_key), and f16 <-> f32 rows. Vec types: Plain<W> (plain loops, any width, always compiled),
// Avx2 (8 wide, AVX2/FMA/F16C), Neon (8 wide as two float32x4), Avx512 (16 wide, AVX-512F/DQ). The
// production kernels (unrotate, unrotate_dot, sum_squares, move_key) pick V16 where the build has
// AVX-512 and the layout allows, else V8 (the best 8-wide type the build has), else element by element.
//
// Bits: every kernel's floating-point operations are the same, in the same order, at every width, with
// the explicit FMA calls of each Vec (the build uses -ffp-contract=off: the compiler fuses nothing of its
// own, so the direct and the portable pass turn a key into the same bits). Plain<W>'s "fma" is a multiply
// then an add: it is the reference the vector types are measured against (_native_testing.kernel_check).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "ggml.h"

namespace edge {

// ---------------------------------------------------------------------------------------------------
// The vector types. Each: W lanes, R its register, load/store of float and f16 (uint16_t) rows, zero,
// add, mul, fma(a, b, c) = a * b + c, fnma(a, b, c) = c - a * b, swap_pairs (x0, x1) -> (x1, x0), and
// store_lanes (for the reductions).

// Plain loops over W floats: the portable fallback (8 wide) and the reference of the kernel test.
template <int W_> struct Plain {
    static constexpr int W = W_;
    static constexpr const char *isa = "scalar";
    struct R {
        float v[W_];
    };
    static R load(const float *p) {
        R r;
        std::memcpy(r.v, p, sizeof r.v);
        return r;
    }
    static void store(float *p, R a) { std::memcpy(p, a.v, sizeof a.v); }
    static R load(const uint16_t *p) {
        R r;
        ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(p), r.v, W);
        return r;
    }
    static void store(uint16_t *p, R a) { ggml_fp32_to_fp16_row(a.v, reinterpret_cast<ggml_fp16_t *>(p), W); }
    static R zero() { return R{}; }
    static R add(R a, R b) {
        for (int k = 0; k < W; ++k) a.v[k] += b.v[k];
        return a;
    }
    static R mul(R a, R b) {
        for (int k = 0; k < W; ++k) a.v[k] *= b.v[k];
        return a;
    }
    static R fma(R a, R b, R c) {
        for (int k = 0; k < W; ++k) c.v[k] += a.v[k] * b.v[k];
        return c;
    }
    static R fnma(R a, R b, R c) {
        for (int k = 0; k < W; ++k) c.v[k] -= a.v[k] * b.v[k];
        return c;
    }
    static R swap_pairs(R a) {
        for (int k = 0; k < W; k += 2) std::swap(a.v[k], a.v[k + 1]);
        return a;
    }
    static void store_lanes(float *p, R a) { store(p, a); }
};

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define EDGE_HAVE_AVX2 1
struct Avx2 {
    static constexpr int W = 8;
    static constexpr const char *isa = "avx2";
    using R = __m256;
    static R load(const float *p) { return _mm256_loadu_ps(p); }
    static void store(float *p, R a) { _mm256_storeu_ps(p, a); }
    static R load(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
    static void store(uint16_t *p, R a) { _mm_storeu_si128(reinterpret_cast<__m128i *>(p), _mm256_cvtps_ph(a, 0)); }
    static R zero() { return _mm256_setzero_ps(); }
    static R add(R a, R b) { return _mm256_add_ps(a, b); }
    static R mul(R a, R b) { return _mm256_mul_ps(a, b); }
    static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }    // a * b + c
    static R fnma(R a, R b, R c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a * b
    static R swap_pairs(R a) { return _mm256_permute_ps(a, 0xB1); }      // (x0, x1) -> (x1, x0)
    static void store_lanes(float *p, R a) { store(p, a); }
};
#endif

#if defined(__ARM_NEON) && defined(__aarch64__)
#define EDGE_HAVE_NEON 1
struct Neon {
    static constexpr int W = 8;
    static constexpr const char *isa = "neon";
    struct R {
        float32x4_t lo, hi;
    };
    static R load(const float *p) { return {vld1q_f32(p), vld1q_f32(p + 4)}; }
    static void store(float *p, R a) { vst1q_f32(p, a.lo), vst1q_f32(p + 4, a.hi); }
    static R load(const uint16_t *p) {
        return {vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))), vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p + 4)))};
    }
    static void store(uint16_t *p, R a) {
        vst1_u16(p, vreinterpret_u16_f16(vcvt_f16_f32(a.lo)));
        vst1_u16(p + 4, vreinterpret_u16_f16(vcvt_f16_f32(a.hi)));
    }
    static R zero() { return {vdupq_n_f32(0), vdupq_n_f32(0)}; }
    static R add(R a, R b) { return {vaddq_f32(a.lo, b.lo), vaddq_f32(a.hi, b.hi)}; }
    static R mul(R a, R b) { return {vmulq_f32(a.lo, b.lo), vmulq_f32(a.hi, b.hi)}; }
    static R fma(R a, R b, R c) { return {vfmaq_f32(c.lo, a.lo, b.lo), vfmaq_f32(c.hi, a.hi, b.hi)}; }
    static R fnma(R a, R b, R c) { return {vfmsq_f32(c.lo, a.lo, b.lo), vfmsq_f32(c.hi, a.hi, b.hi)}; }
    static R swap_pairs(R a) { return {vrev64q_f32(a.lo), vrev64q_f32(a.hi)}; }
    static void store_lanes(float *p, R a) { store(p, a); }
};
#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define EDGE_WIDE16 1
struct Avx512 {
    static constexpr int W = 16;
    static constexpr const char *isa = "avx512";
    using R = __m512;
    static R load(const float *p) { return _mm512_loadu_ps(p); }
    static void store(float *p, R a) { _mm512_storeu_ps(p, a); }
    static R load(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
    static void store(uint16_t *p, R a) { _mm256_storeu_si256(reinterpret_cast<__m256i *>(p), _mm512_cvtps_ph(a, 0)); }
    static R zero() { return _mm512_setzero_ps(); }
    static R add(R a, R b) { return _mm512_add_ps(a, b); }
    static R mul(R a, R b) { return _mm512_mul_ps(a, b); }
    static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
    static R fnma(R a, R b, R c) { return _mm512_fnmadd_ps(a, b, c); }
    static R swap_pairs(R a) { return _mm512_permute_ps(a, 0xB1); }
    static void store_lanes(float *p, R a) { store(p, a); }
};
using V16 = Avx512;
#endif

// The eight-wide type the pass uses: AVX2/FMA, Arm NEON, or plain loops.
#if defined(EDGE_HAVE_AVX2)
using V8 = Avx2;
#elif defined(EDGE_HAVE_NEON)
using V8 = Neon;
#else
using V8 = Plain<8>;
#endif

inline float f_load(const float *p) { return *p; }
inline float f_load(const uint16_t *p) { return ggml_fp16_to_fp32(*p); }

// ---------------------------------------------------------------------------------------------------
// The one order every reduction (dot products, squared norms) adds in, at any vector width: sixteen partial
// sums, lane k taking dims d = k (mod 16) in increasing d; then lanes k and k + 8 are added, then the eight
// as ((t0 + t1) + (t2 + t3)) + ((t4 + t5) + (t6 + t7)). So a score has the same bits with AVX-512, AVX2 or
// NEON, and each partial sum is a chain of D / 16 additions, not D / 8: half the wait on the adder. An
// eight-wide type keeps two accumulators, dims 16m + k and 16m + 8 + k; a sixteen-wide one, one.
template <class V> struct Acc {
    static constexpr int N = 16 / V::W;
    typename V::R a[N];
    Acc() {
        for (auto &r : a) r = V::zero();
    }
    // The accumulator of the W dims from d on.
    typename V::R &of(int d) { return a[(d / V::W) % N]; }
    float sum() const {
        float p[16];
        for (int i = 0; i < N; ++i) V::store_lanes(p + i * V::W, a[i]);
        float t[8];
        for (int k = 0; k < 8; ++k) t[k] = p[k] + p[k + 8];
        return ((t[0] + t[1]) + (t[2] + t[3])) + ((t[4] + t[5]) + (t[6] + t[7]));
    }
};

// One head's key and its rotary pairs as llama.cpp rotates them: normal RoPE pairs (2i, 2i + 1), NeoX
// pairs (i, i + n_rot / 2); dims from n_rot on are not rotated. With per-position tables C[d] = cos of
// d's pair angle and S[d] = +sin for a pair's first element, -sin for its second:
//   R(-pos) x = x * C + partner(x) * S,   R(+pos) x = x * C - partner(x) * S.
// Keys stay in their stored layout; a normal pair's partner is its neighbour (one in-lane shuffle).
struct RopeLayout {
    bool neox = false;
    int n_rot = 0, D = 0;
    bool vec = false;    // whole blocks of 8: no block straddles a pair or the unrotated tail
    bool vec16 = false;  // whole blocks of 16 as well (the AVX-512 kernels)
};

// Whether a layout is made of whole blocks of W (the W-wide kernels may run on it).
inline bool fits_width(const RopeLayout &r, int W) {
    return r.n_rot % W == 0 && r.D % W == 0 && (!r.neox || (r.n_rot / 2) % W == 0);
}

template <class V, bool NEOX, typename E> inline typename V::R partner(const E *x, typename V::R xv, int d, int half) {
    if constexpr (!NEOX) return V::swap_pairs(xv);
    return V::load(x + (d < half ? d + half : d - half));
}

template <typename E> inline float partner1(const E *x, int d, const RopeLayout &r) {
    if (!r.neox) return f_load(x + (d ^ 1));
    const int half = r.n_rot / 2;
    return f_load(x + (d < half ? d + half : d - half));
}

// The vector kernels below take the pairing as a template argument (no test of it per block): f gets
// std::true_type for NeoX pairs, std::false_type for normal ones.
template <typename F> inline auto by_pairing(const RopeLayout &r, F &&f) {
    return r.neox ? f(std::true_type{}) : f(std::false_type{});
}

// ---------------------------------------------------------------------------------------------------
// The kernels at one width V (the layout must fit it: fits_width(r, V::W), D % V::W == 0 for sum_squares).

// u = R(-pos) x; returns |x|^2 (a rotation keeps the norm).
template <class V, bool NEOX>
inline float unrotate_vec(const float *__restrict x, const float *__restrict C, const float *__restrict S,
                          const RopeLayout &r, float *__restrict u) {
    const int half = r.n_rot / 2;
    Acc<V> n2;
    for (int d = 0; d < r.D; d += V::W) {
        const auto xv = V::load(x + d);
        V::store(u + d, d < r.n_rot ? V::fma(partner<V, NEOX>(x, xv, d, half), V::load(S + d), V::mul(xv, V::load(C + d)))
                                    : xv);
        auto &a = n2.of(d);
        a = V::fma(xv, xv, a);
    }
    return n2.sum();
}

// (R(-pos) x) . T without storing the turned key; |x|^2 into n2. x: f16 or f32, as the cache stores it.
template <class V, bool NEOX, typename E>
inline float unrotate_dot_vec(const E *__restrict x, const float *__restrict C, const float *__restrict S,
                              const float *__restrict T, const RopeLayout &r, float &n2) {
    const int half = r.n_rot / 2;
    Acc<V> dot, nn;
    for (int d = 0; d < r.D; d += V::W) {
        const auto xv = V::load(x + d);
        const auto u =
            d < r.n_rot ? V::fma(partner<V, NEOX>(x, xv, d, half), V::load(S + d), V::mul(xv, V::load(C + d))) : xv;
        auto &a = dot.of(d), &b = nn.of(d);
        a = V::fma(u, V::load(T + d), a);
        b = V::fma(xv, xv, b);
    }
    n2 = nn.sum();
    return dot.sum();
}

template <class V, typename E> inline float sum_squares_vec(const E *__restrict x, int D) {
    Acc<V> acc;
    for (int d = 0; d < D; d += V::W) {
        const auto v = V::load(x + d);
        auto &a = acc.of(d);
        a = V::fma(v, v, a);
    }
    return acc.sum();
}

// dst = R(+pos) src (forward) or R(-pos) src, in the cache's own type; dst may be src (in place: a
// NeoX pair's two halves are read before either is written). Element by element: the same bits at any
// vector width.
template <class V, typename E>
inline void move_key_vec(const E *src, E *dst, const float *__restrict C, const float *__restrict S, bool forward,
                         const RopeLayout &r) {
    using R = typename V::R;
    auto turn = [forward](R x, R p, R c, R s) { return forward ? V::fnma(p, s, V::mul(x, c)) : V::fma(p, s, V::mul(x, c)); };
    if (!r.neox) {
        for (int d = 0; d < r.n_rot; d += V::W) {
            const R x = V::load(src + d);
            V::store(dst + d, turn(x, V::swap_pairs(x), V::load(C + d), V::load(S + d)));
        }
    } else {
        const int half = r.n_rot / 2;
        for (int i = 0; i < half; i += V::W) {
            const R a = V::load(src + i), b = V::load(src + half + i);
            V::store(dst + i, turn(a, b, V::load(C + i), V::load(S + i)));
            V::store(dst + half + i, turn(b, a, V::load(C + half + i), V::load(S + half + i)));
        }
    }
    if (dst != src)
        for (int d = r.n_rot; d < r.D; ++d) dst[d] = src[d];
}

// ---------------------------------------------------------------------------------------------------
// Element by element (layouts the vector kernels do not cover).

inline float unrotate_scalar(const float *__restrict x, const float *__restrict C, const float *__restrict S,
                             const RopeLayout &r, float *__restrict u) {
    float n2 = 0;
    for (int d = 0; d < r.D; ++d) {
        u[d] = d < r.n_rot ? x[d] * C[d] + partner1(x, d, r) * S[d] : x[d];
        n2 += x[d] * x[d];
    }
    return n2;
}

template <typename E>
inline float unrotate_dot_scalar(const E *__restrict x, const float *__restrict C, const float *__restrict S,
                                 const float *__restrict T, const RopeLayout &r, float &n2) {
    float dot = 0, nn = 0;
    for (int d = 0; d < r.D; ++d) {
        const float xd = f_load(x + d);
        const float u = d < r.n_rot ? xd * C[d] + partner1(x, d, r) * S[d] : xd;
        dot += u * T[d];
        nn += xd * xd;
    }
    n2 = nn;
    return dot;
}

// y = R(+pos) x (forward) or R(-pos) x, one element at a time; y must not alias x.
inline void rotate_to(const float *__restrict x, const float *__restrict C, const float *__restrict S, bool forward,
                      const RopeLayout &r, float *__restrict y) {
    for (int d = 0; d < r.D; ++d) {
        if (d >= r.n_rot) {
            y[d] = x[d];
            continue;
        }
        const float xc = x[d] * C[d], p = partner1(x, d, r) * S[d];
        y[d] = forward ? xc - p : xc + p;
    }
}

// move_key one element at a time; tmp: 2 D floats.
template <typename E>
inline void move_key_scalar(const E *src, E *dst, const float *__restrict C, const float *__restrict S, bool forward,
                            const RopeLayout &r, float *__restrict tmp) {
    for (int d = 0; d < r.D; ++d) tmp[d] = f_load(src + d);
    rotate_to(tmp, C, S, forward, r, tmp + r.D);
    for (int d = 0; d < r.D; ++d) {
        if constexpr (std::is_same_v<E, float>)
            dst[d] = tmp[r.D + d];
        else
            dst[d] = ggml_fp32_to_fp16(tmp[r.D + d]);
    }
}

template <typename E> inline float sum_squares_scalar(const E *__restrict x, int D) {
    float s = 0;
    for (int d = 0; d < D; ++d) s += f_load(x + d) * f_load(x + d);
    return s;
}

// ---------------------------------------------------------------------------------------------------
// What the pass calls: the widest kernel the build and the layout allow.

inline float unrotate(const float *__restrict x, const float *__restrict C, const float *__restrict S,
                      const RopeLayout &r, float *__restrict u) {
    if (r.vec) {
#ifdef EDGE_WIDE16
        if (r.vec16)
            return by_pairing(r, [&](auto neox) { return unrotate_vec<V16, decltype(neox)::value>(x, C, S, r, u); });
#endif
        return by_pairing(r, [&](auto neox) { return unrotate_vec<V8, decltype(neox)::value>(x, C, S, r, u); });
    }
    return unrotate_scalar(x, C, S, r, u);
}

template <typename E>
inline float unrotate_dot(const E *__restrict x, const float *__restrict C, const float *__restrict S,
                          const float *__restrict T, const RopeLayout &r, float &n2) {
    if (r.vec) {
#ifdef EDGE_WIDE16
        if (r.vec16)
            return by_pairing(r, [&](auto neox) { return unrotate_dot_vec<V16, decltype(neox)::value>(x, C, S, T, r, n2); });
#endif
        return by_pairing(r, [&](auto neox) { return unrotate_dot_vec<V8, decltype(neox)::value>(x, C, S, T, r, n2); });
    }
    return unrotate_dot_scalar(x, C, S, T, r, n2);
}

// dst = R(+pos) src (forward) or R(-pos) src, in the cache's own type; dst may be src. tmp: 2 D floats
// for the element-by-element path.
template <typename E>
inline void move_key(const E *src, E *dst, const float *__restrict C, const float *__restrict S, bool forward,
                     const RopeLayout &r, float *__restrict tmp) {
    if (r.vec) {
#ifdef EDGE_WIDE16
        if (r.vec16) return move_key_vec<V16>(src, dst, C, S, forward, r);
#endif
        return move_key_vec<V8>(src, dst, C, S, forward, r);
    }
    move_key_scalar(src, dst, C, S, forward, r, tmp);
}

template <typename E> inline float sum_squares(const E *__restrict x, int D) {
#ifdef EDGE_WIDE16
    if (D % 16 == 0) return sum_squares_vec<V16>(x, D);
#endif
    if (D % 8 == 0) return sum_squares_vec<V8>(x, D);
    return sum_squares_scalar(x, D);
}

// f16 -> f32 for whole rows: the hardware conversions where the build CPU has them (x86 F16C, Arm
// NEON), ggml's scalar ones otherwise. These run for every key and value of a pass.
inline void f16_to_f32(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + i))));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
#endif
    if (i < n) ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(src + i), dst + i, int64_t(n - i));
}

// A row of the cache (f16 or f32) as floats.
inline void to_float(int type, const uint8_t *src, float *dst, size_t n) {
    if (type == GGML_TYPE_F16)
        f16_to_f32(reinterpret_cast<const uint16_t *>(src), dst, n);
    else
        std::memcpy(dst, src, n * 4);
}

}  // namespace edge
