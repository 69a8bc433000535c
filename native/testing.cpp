// The edge_runtime._native_testing module: test-only hooks, kept out of the production module. They take
// the _native module's KVPass objects (pybind11 shares registered types between modules built against the
// same pybind11 internals; the class comes from kv_pass.hpp), and check the vector kernels of simd.hpp at
// every width the build has against the plain-loop reference (kernel_check).

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "kv_pass.hpp"
#include "kv_state.hpp"
#include "llama.h"
#include "simd.hpp"

namespace py = pybind11;

namespace edge {

struct KVPassTestAccess {
    // Write back a corrupted (truncated) copy of B to exercise the restore path of apply().
    static void truncated_write_back(KVPass &kv) {
        std::memcpy(kv.b_.data(), kv.a_.data(), kv.size_a_);
        if (llama_state_seq_set_data(kv.ctx_, kv.b_.data(), kv.size_a_ / 2, kv.seq_) == 0) {
            if (!kv.restore()) throw std::runtime_error("restore failed: memory lost");
            throw std::runtime_error("writing the compressed KV state failed; the memory was restored as it was");
        }
    }

    // Rewrite the pass's sequence with its video cells in reverse cell order (reverse) and/or their
    // positions moved by `shift`, K and V untouched: layouts the direct path must refuse. The model sees
    // the same memory when shift is 0 (cell order does not matter to attention).
    static void relayout(KVPass &kv, bool reverse, int shift) {
        kv.read();
        std::vector<int32_t> order(kv.prefix_cells_);
        if (reverse)
            order.insert(order.end(), kv.slot_cells_.rbegin(), kv.slot_cells_.rend());
        else
            order.insert(order.end(), kv.slot_cells_.begin(), kv.slot_cells_.end());
        const size_t w = write_reordered(kv.b_.data(), kv.view_, kv.a_.data(), order, kv.prefix_cells_.size(), shift);
        if (w != kv.size_a_) throw std::logic_error("relayout size mismatch");
        if (llama_state_seq_set_data(kv.ctx_, kv.b_.data(), w, kv.seq_) == 0)
            throw std::runtime_error("relayout: set_data failed");
    }
};

namespace {

// ---------------------------------------------------------------------------------------------------
// kernel_check: every vector kernel at every width against Plain<8> (plain loops, a multiply then an add
// where the vector types fuse them), on the same random rows.

float as_float(float x) { return x; }
float as_float(uint16_t x) { return ggml_fp16_to_fp32(x); }

struct Inputs {
    std::vector<float> x, T, C, S;  // rows of D floats (C, S: n_rot); x also as f16
    std::vector<uint16_t> xh;
};

// Rows like a pass sees: keys with outliers, the tables of random positions (llama.cpp's default base),
// T a sum of a few unit keys.
Inputs make_inputs(std::mt19937 &rng, const RopeLayout &r, int rows) {
    std::normal_distribution<float> g(0.0f, 1.0f);
    std::uniform_int_distribution<int> pos(0, 8191);
    Inputs in;
    const size_t D = size_t(r.D), nr = size_t(r.n_rot);
    in.x.resize(rows * D);
    in.T.resize(rows * D);
    in.C.resize(rows * nr);
    in.S.resize(rows * nr);
    for (auto &v : in.x) v = g(rng) * (g(rng) > 2.0f ? 8.0f : 1.0f);
    for (auto &v : in.T) v = 3.0f * g(rng);
    in.xh.resize(in.x.size());
    ggml_fp32_to_fp16_row(in.x.data(), reinterpret_cast<ggml_fp16_t *>(in.xh.data()), int64_t(in.x.size()));
    const int half = r.n_rot / 2;
    for (int q = 0; q < rows; ++q) {
        const int p = pos(rng);
        for (int d = 0; d < r.n_rot; ++d) {
            const int i = r.neox ? d % half : d / 2;
            const bool first = r.neox ? d < half : d % 2 == 0;
            const double th = p * std::pow(10000.0, -2.0 * i / r.n_rot);
            in.C[q * nr + d] = float(std::cos(th));
            in.S[q * nr + d] = float(first ? std::sin(th) : -std::sin(th));
        }
    }
    return in;
}

// What one width computes on the inputs, every kernel's outputs in one list each.
struct Outputs {
    std::vector<float> unrotate, unrotate_dot_f32, unrotate_dot_f16, sum_squares_f32, sum_squares_f16;
    std::vector<float> move_key_f32, move_key_f16, move_key_in_place_f16, f16_load, f16_store;
    // The dot products' condition: sum over d of (|x_d| + |partner_d|) |T_d|, the size of what they add up
    // (a dot of many terms can cancel to near 0; its rounding errors scale with the terms, not the sum).
    std::vector<float> dot_scale_f32, dot_scale_f16;
};

template <class V, bool NEOX> void run_width(const Inputs &in, const RopeLayout &r, int rows, Outputs &o) {
    const size_t D = size_t(r.D), nr = size_t(r.n_rot);
    std::vector<float> u(D), yf(D);
    std::vector<uint16_t> yh(D), ip(D);
    for (int q = 0; q < rows; ++q) {
        const float *x = &in.x[q * D], *T = &in.T[q * D], *C = &in.C[q * nr], *S = &in.S[q * nr];
        const uint16_t *xh = &in.xh[q * D];
        o.unrotate.push_back(unrotate_vec<V, NEOX>(x, C, S, r, u.data()));
        o.unrotate.insert(o.unrotate.end(), u.begin(), u.end());
        float n2, s32 = 0, s16 = 0;
        for (int d = 0; d < r.D; ++d) {
            const float p32 = d < r.n_rot ? std::fabs(partner1(x, d, r)) : 0.0f;
            const float p16 = d < r.n_rot ? std::fabs(partner1(xh, d, r)) : 0.0f;
            s32 += (std::fabs(x[d]) + p32) * std::fabs(T[d]);
            s16 += (std::fabs(as_float(xh[d])) + p16) * std::fabs(T[d]);
        }
        o.unrotate_dot_f32.push_back(unrotate_dot_vec<V, NEOX>(x, C, S, T, r, n2));
        o.unrotate_dot_f32.push_back(n2);
        o.dot_scale_f32.insert(o.dot_scale_f32.end(), {s32, n2});
        o.unrotate_dot_f16.push_back(unrotate_dot_vec<V, NEOX>(xh, C, S, T, r, n2));
        o.unrotate_dot_f16.push_back(n2);
        o.dot_scale_f16.insert(o.dot_scale_f16.end(), {s16, n2});
        o.sum_squares_f32.push_back(sum_squares_vec<V>(x, r.D));
        o.sum_squares_f16.push_back(sum_squares_vec<V>(xh, r.D));
        for (bool forward : {true, false}) {
            move_key_vec<V>(x, yf.data(), C, S, forward, r);
            o.move_key_f32.insert(o.move_key_f32.end(), yf.begin(), yf.end());
            move_key_vec<V>(xh, yh.data(), C, S, forward, r);
            for (uint16_t h : yh) o.move_key_f16.push_back(as_float(h));
            std::copy(xh, xh + D, ip.begin());
            move_key_vec<V>(ip.data(), ip.data(), C, S, forward, r);
            for (uint16_t h : ip) o.move_key_in_place_f16.push_back(as_float(h));
        }
        for (size_t d = 0; d < D; d += V::W) {
            float f[16];
            V::store(f, V::load(xh + d));  // f16 -> f32
            o.f16_load.insert(o.f16_load.end(), f, f + V::W);
            uint16_t h[16];
            V::store(h, V::load(x + d));  // f32 -> f16
            for (int k = 0; k < V::W; ++k) o.f16_store.push_back(as_float(h[k]));
        }
    }
}

template <class V> Outputs run(const Inputs &in, const RopeLayout &r, int rows) {
    Outputs o;
    by_pairing(r, [&](auto neox) { run_width<V, decltype(neox)::value>(in, r, rows, o); });
    return o;
}

#define EDGE_KERNELS(X)                                                                                      \
    X(unrotate) X(unrotate_dot_f32) X(unrotate_dot_f16) X(sum_squares_f32) X(sum_squares_f16) X(move_key_f32) \
        X(move_key_f16) X(move_key_in_place_f16) X(f16_load) X(f16_store)

struct Diff {
    double abs = 0, rel = 0;  // max |a - b|; max |a - b| / max(|b|, scale, 1)
    bool bits_equal = true;
};

void compare(const std::vector<float> &a, const std::vector<float> &b, Diff &d, const std::vector<float> *scale) {
    if (a.size() != b.size()) throw std::logic_error("kernel_check: output sizes differ");
    for (size_t i = 0; i < a.size(); ++i) {
        const double e = std::fabs(double(a[i]) - double(b[i]));
        const double s = std::max(std::fabs(double(b[i])), scale ? double((*scale)[i]) : 0.0);
        d.abs = std::max(d.abs, e);
        d.rel = std::max(d.rel, e / std::max(s, 1.0));
        d.bits_equal = d.bits_equal && std::memcmp(&a[i], &b[i], 4) == 0;
    }
}

const std::vector<float> *scale_of(const Outputs &ref, const std::string &kernel) {
    if (kernel == "unrotate_dot_f32") return &ref.dot_scale_f32;
    if (kernel == "unrotate_dot_f16") return &ref.dot_scale_f16;
    return nullptr;
}

struct Width {
    std::string name, isa;
    Outputs (*run)(const Inputs &, const RopeLayout &, int);
    int W;
};

// The widths this build has: 16 (AVX-512), 8 (AVX2, NEON or plain loops), and the reference.
std::vector<Width> widths() {
    std::vector<Width> w;
#ifdef EDGE_WIDE16
    w.push_back({"16", V16::isa, &run<V16>, 16});
#endif
    w.push_back({"8", V8::isa, &run<V8>, 8});
    w.push_back({"ref", Plain<8>::isa, &run<Plain<8>>, 8});
    return w;
}

py::dict kernel_check(uint32_t seed, int rows) {
    std::mt19937 rng(seed);
    // (D, n_rot, NeoX): whole and partial rotation, both pairings, blocks of 8 only (80, 48/2) and of 16.
    const int layouts[][3] = {{64, 64, 0}, {64, 64, 1}, {128, 128, 0}, {128, 128, 1}, {128, 64, 0},
                              {128, 64, 1}, {96, 32, 1}, {80, 80, 0},  {80, 48, 1},  {256, 256, 1}};
    const auto ws = widths();
    std::vector<std::vector<Diff>> vs_ref(ws.size()), vs_8(ws.size());  // [width][kernel]
    constexpr int n_kernels = 10;
    for (auto &v : vs_ref) v.resize(n_kernels);
    for (auto &v : vs_8) v.resize(n_kernels);
    py::list checked;
    for (const auto &lay : layouts) {
        RopeLayout r;
        r.D = lay[0];
        r.n_rot = lay[1];
        r.neox = lay[2] != 0;
        r.vec = fits_width(r, 8);
        r.vec16 = fits_width(r, 16);
        if (!r.vec) throw std::logic_error("kernel_check: a layout the 8-wide kernels do not cover");
        const Inputs in = make_inputs(rng, r, rows);
        const Outputs ref = run<Plain<8>>(in, r, rows);
        const Outputs o8 = run<V8>(in, r, rows);
        for (size_t wi = 0; wi < ws.size(); ++wi) {
            if (!fits_width(r, ws[wi].W)) continue;
            const Outputs o = ws[wi].run(in, r, rows);
            int k = 0;
#define EDGE_CMP(kernel)                                                          \
    compare(o.kernel, ref.kernel, vs_ref[wi][size_t(k)], scale_of(ref, #kernel)); \
    compare(o.kernel, o8.kernel, vs_8[wi][size_t(k)], nullptr);                   \
    ++k;
            EDGE_KERNELS(EDGE_CMP)
#undef EDGE_CMP
        }
        checked.append(py::make_tuple(r.D, r.n_rot, r.neox ? "neox" : "normal"));
    }
    py::dict isa, diff, rel, same_as_8;
    for (size_t wi = 0; wi < ws.size(); ++wi) isa[py::str(ws[wi].name)] = ws[wi].isa;
    int k = 0;
#define EDGE_OUT(kernel)                                                   \
    {                                                                    \
        py::dict a, b, c;                                                \
        for (size_t wi = 0; wi < ws.size(); ++wi) {                      \
            a[py::str(ws[wi].name)] = vs_ref[wi][size_t(k)].abs;         \
            b[py::str(ws[wi].name)] = vs_ref[wi][size_t(k)].rel;         \
            c[py::str(ws[wi].name)] = vs_8[wi][size_t(k)].bits_equal;    \
        }                                                                \
        diff[#kernel] = a;                                                 \
        rel[#kernel] = b;                                                  \
        same_as_8[#kernel] = c;                                            \
        ++k;                                                             \
    }
    EDGE_KERNELS(EDGE_OUT)
#undef EDGE_OUT
    // The row conversion the pass reads every f16 key and value with, against ggml's.
    {
        std::vector<uint16_t> h(1000);
        std::uniform_int_distribution<int> bits(0, 0xffff);
        for (auto &v : h) v = uint16_t(bits(rng));
        std::vector<float> a(h.size()), b(h.size());
        f16_to_f32(h.data(), a.data(), h.size());
        ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(h.data()), b.data(), int64_t(h.size()));
        size_t differ = 0;
        for (size_t i = 0; i < h.size(); ++i) differ += std::memcmp(&a[i], &b[i], 4) != 0;  // NaNs by their bits
        diff["f16_to_f32_row_bits_differ"] = differ;
    }
    py::dict out;
    out["isa"] = isa;
    out["diff"] = diff;
    out["rel"] = rel;
    out["same_bits_as_8"] = same_as_8;
    out["layouts"] = checked;
    out["rows"] = rows;
    return out;
}

}  // namespace
}  // namespace edge

PYBIND11_MODULE(_native_testing, m) {
    m.doc() = "Test-only hooks of edge-runtime's native pass (not for production use).";
    py::module_::import("edge_runtime._native");  // registers KVPass, which these hooks take
    m.def("truncated_write_back", &edge::KVPassTestAccess::truncated_write_back, py::arg("kv"),
          "Write back a truncated copy of the state read last (llama.cpp refuses it): the restore path of apply().");
    m.def("relayout", &edge::KVPassTestAccess::relayout, py::arg("kv"), py::arg("reverse"), py::arg("shift"),
          "Rewrite the sequence with its video cells reversed and/or their positions shifted, K and V untouched.");
    m.def("kernel_check", &edge::kernel_check, py::arg("seed"), py::arg("rows") = 64,
          "Every vector kernel at every width the build has, on the same random rows, against the plain loops: "
          "max abs and relative differences per kernel and width, whether each width has the 8-wide's bits, "
          "and which ISA each width used.");
}
