// The compression pass over llama.cpp's KV cache, in place of sequence 0. Two ways to reach the cache:
//
// Direct (in place; CPU caches in reindex mode): an evaluation callback (cb_eval, public API) records
// llama.cpp's own K and V tensors ("cache_k_l<il>", "cache_v_l<il>") during a decode. The pass scores
// straight from them, then moves the j-th kept token of each head into cell P + j (P = prefix cells),
// re-rotating its key to position P + j, and frees the cells after P + C with llama_memory_seq_rm. No
// cell metadata changes: in reindex mode cell c of sequence 0 holds position c (see read_direct), and
// the compacted cache keeps exactly that. The state is never copied.
//
// Portable (any backend, keep mode, M-RoPE): copy the sequence's state out (llama_state_seq_get_data)
// into buffer A, score and select, gather the kept rows of every head into buffer B with rewritten cell
// records (keys re-rotated in reindex mode), and hand B back (llama_state_seq_set_data). llama.cpp wipes
// the sequence when set_data fails; A is untouched then and goes back instead.
//
// Both paths run the same scoring, selection and re-rotation code on the same bytes, so they leave
// byte-identical caches (tests/test_direct_pass.py). All buffers are sized once; a pass allocates nothing.
//
// Method: InfiniPot-V, https://arxiv.org/abs/2506.15745 (TaR on keys, VaN on values, per layer and head).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "ggml-backend.h"
#include "ggml.h"
#include "kv_state.hpp"
#include "llama.h"

namespace py = pybind11;
using edge::StateView;

#if defined(__GNUC__)
#define EDGE_NOINLINE __attribute__((noinline))
#else
#define EDGE_NOINLINE
#endif

namespace {

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Rotary embedding as llama.cpp applies it to keys (normal: adjacent pairs; NeoX: halves).
struct Rope {
    int type = LLAMA_ROPE_TYPE_NORM;
    int n_rot = 0;
    double freq_base = 10000.0;
    double freq_scale = 1.0;
};

// A score and its slot: selection sorts these contiguous pairs rather than indices into a score array.
struct Scored {
    double score;
    int32_t slot;
};

// "highest score first, ties: lower slot index first": the contract the NumPy reference shares.
struct ByScore {
    bool operator()(const Scored &a, const Scored &b) const {
        return a.score > b.score || (a.score == b.score && a.slot < b.slot);
    }
};

// Keep the k best of c[0..n) in c[0..k), in any order.
void top_k(Scored *c, size_t n, size_t k) {
    if (k >= n) return;
    std::nth_element(c, c + k, c + n, ByScore{});
}

// Independent partial sums: the compiler turns each into one vector register (no -ffast-math needed, the
// order of additions is fixed by the source), and the same code gives the same bits on every path.
constexpr int kLanes = 8;

inline float lane_sum(const float *acc) {
    float s = 0;
    for (int k = 0; k < kLanes; ++k) s += acc[k];
    return s;
}

// x (one head's key in halves layout: pair i = x[i], x[half + i], then unrotated dims) turned back by
// the angles c, s (u = R(-pos) x) into u; returns |x|^2.
inline float unrotate(const float *__restrict x, const float *__restrict c, const float *__restrict s, int half,
                      int D, float *__restrict u) {
    float nrm[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= half; i += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            const float a = x[i + k], b = x[half + i + k];
            u[i + k] = a * c[i + k] + b * s[i + k];
            u[half + i + k] = b * c[i + k] - a * s[i + k];
            nrm[k] += a * a + b * b;
        }
    float n2 = 0;
    for (; i < half; ++i) {
        const float a = x[i], b = x[half + i];
        u[i] = a * c[i] + b * s[i];
        u[half + i] = b * c[i] - a * s[i];
        n2 += a * a + b * b;
    }
    for (int d = 2 * half; d < D; ++d) {
        u[d] = x[d];
        n2 += x[d] * x[d];
    }
    return n2 + lane_sum(nrm);
}

// (R(-pos) x) . S without storing the turned key; |x|^2 into norm2. Layout as in unrotate().
inline float unrotate_dot(const float *__restrict x, const float *__restrict c, const float *__restrict s,
                          const float *__restrict S, int half, int D, float &norm2) {
    float dot[kLanes] = {}, nrm[kLanes] = {};
    int i = 0;
    for (; i + kLanes <= half; i += kLanes)
        for (int k = 0; k < kLanes; ++k) {
            const float a = x[i + k], b = x[half + i + k];
            const float lo = a * c[i + k] + b * s[i + k], hi = b * c[i + k] - a * s[i + k];
            dot[k] += lo * S[i + k] + hi * S[half + i + k];
            nrm[k] += a * a + b * b;
        }
    float d0 = 0, n0 = 0;
    for (; i < half; ++i) {
        const float a = x[i], b = x[half + i];
        d0 += (a * c[i] + b * s[i]) * S[i] + (b * c[i] - a * s[i]) * S[half + i];
        n0 += a * a + b * b;
    }
    for (int d = 2 * half; d < D; ++d) {
        d0 += x[d] * S[d];
        n0 += x[d] * x[d];
    }
    norm2 = n0 + lane_sum(nrm);
    return d0 + lane_sum(dot);
}

inline float sum_squares(const float *__restrict x, int D) {
    float acc[kLanes] = {};
    int d = 0;
    for (; d + kLanes <= D; d += kLanes)
        for (int k = 0; k < kLanes; ++k) acc[k] += x[d + k] * x[d + k];
    float s = 0;
    for (; d < D; ++d) s += x[d] * x[d];
    return s + lane_sum(acc);
}

}  // namespace

// f16 <-> f32 for whole rows: the hardware conversions where the build CPU has them (x86 F16C, Arm
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

inline void f32_to_f16(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), 0));
#elif defined(__ARM_NEON) && defined(__aarch64__)
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#endif
    if (i < n) ggml_fp32_to_fp16_row(src + i, reinterpret_cast<ggml_fp16_t *>(dst + i), int64_t(n - i));
}

inline void to_float(int type, const uint8_t *src, float *dst, size_t n) {
    if (type == GGML_TYPE_F16)
        f16_to_f32(reinterpret_cast<const uint16_t *>(src), dst, n);
    else
        std::memcpy(dst, src, n * 4);
}

inline void from_float(int type, const float *src, uint8_t *dst, size_t n) {
    if (type == GGML_TYPE_F16)
        f32_to_f16(src, reinterpret_cast<uint16_t *>(dst), n);
    else
        std::memcpy(dst, src, n * 4);
}

// ---------------------------------------------------------------------------------------------------
// The evaluation callback that finds llama.cpp's KV tensors. llama.cpp names them "cache_k_l<il>" and
// "cache_v_l<il>" (llama_kv_cache's constructor, no name tag for a model's one cache); the graph reaches
// them through views (get_k/get_v, set_rows), whose view_src is always the root tensor. It never asks
// for a node's data, so the scheduler still runs each split as one graph.

class KVCapture {
  public:
    explicit KVCapture(int n_layer) : k_(size_t(std::max(n_layer, 0)), nullptr), v_(k_.size(), nullptr) {}

    static bool on_eval(ggml_tensor *t, bool ask, void *user_data) {
        auto *self = static_cast<KVCapture *>(user_data);
        if (!ask || self->complete_) return false;  // captured: nothing more to do for the stream's life
        self->look(t);
        for (ggml_tensor *s : t->src)
            if (s) self->look(s);
        return false;
    }

    bool complete() const { return complete_; }
    bool conflict() const { return conflict_; }
    size_t n_layer() const { return k_.size(); }
    ggml_tensor *k(size_t l) const { return k_[l]; }
    ggml_tensor *v(size_t l) const { return v_[l]; }
    uintptr_t callback() const { return reinterpret_cast<uintptr_t>(&KVCapture::on_eval); }
    uintptr_t user_data() const { return reinterpret_cast<uintptr_t>(this); }

    // What was found, per layer (tests and diagnostics).
    py::list describe() const {
        py::list out;
        for (size_t l = 0; l < k_.size(); ++l) {
            py::dict d;
            d["layer"] = l;
            const std::pair<const char *, ggml_tensor *> kv[2] = {{"k", k_[l]}, {"v", v_[l]}};
            for (const auto &[name, t] : kv) {
                if (!t) {
                    d[name] = py::none();
                    continue;
                }
                py::dict e;
                e["name"] = std::string(t->name);
                e["type"] = ggml_type_name(t->type);
                e["ne"] = std::vector<int64_t>(t->ne, t->ne + 4);
                e["nb"] = std::vector<size_t>(t->nb, t->nb + 4);
                e["host"] = t->buffer && ggml_backend_buffer_is_host(t->buffer);
                d[name] = e;
            }
            out.append(d);
        }
        return out;
    }

  private:
    void look(ggml_tensor *t) {
        if (t->view_src) t = t->view_src;
        const char *n = t->name;
        if (std::strncmp(n, "cache_", 6) != 0 || (n[6] != 'k' && n[6] != 'v') || std::strncmp(n + 7, "_l", 2) != 0)
            return;
        char *end = nullptr;
        const long il = std::strtol(n + 9, &end, 10);
        if (end == n + 9 || *end != '\0' || il < 0 || size_t(il) >= k_.size()) return;
        ggml_tensor *&slot = (n[6] == 'k' ? k_ : v_)[size_t(il)];
        if (slot == t) return;
        if (slot) conflict_ = true;  // two caches under one name: not a layout the direct path knows
        slot = t;
        if (++found_ == 2 * k_.size() && !conflict_) complete_ = true;
    }

    std::vector<ggml_tensor *> k_, v_;
    size_t found_ = 0;
    bool complete_ = false, conflict_ = false;
};

// ---------------------------------------------------------------------------------------------------

// Where one layer's K and V live for this pass: buffer A (portable) or llama.cpp's tensors (direct).
struct LayerSrc {
    int k_type = 0, v_type = 0;
    uint8_t *k = nullptr, *v = nullptr;
    size_t k_row = 0;   // bytes from one cell's K row (all heads) to the next
    size_t v_row = 0;   // V rows: bytes per cell; transposed V: bytes from one dimension's run to the next
    size_t v_elem = 0;  // bytes per V element
};

// Everything one worker needs for one layer, sized once (for the budget) and reused by every pass.
struct Scratch {
    std::vector<float> raw;             // one cell's row as stored, converted to float
    std::vector<float> row;             // the same row's keys in halves layout
    std::vector<float> unit;            // one turned key, then angle and rotation scratch
    std::vector<float> sum;             // [H][p][D] sums of the recent frames' unit keys
    std::vector<float> run, vacc;       // transposed V: one dimension over the slots; [H][N] sums of squares
    std::vector<double> tar, van;       // [H][N]
    std::vector<double> pooled, grid;
    std::vector<Scored> cand;
    std::vector<uint8_t> mark;          // [H][N]: kept (recent, then chosen)
    std::vector<uint8_t> any_recent, any_past, present;
};

// Run f(layer, scratch) for every layer on `n` threads (layers split round-robin); rethrow the first error.
template <typename F> void for_layers(size_t n_layer, std::vector<Scratch> &scratch, F &&f) {
    const size_t n = std::min(scratch.size(), n_layer);
    if (n <= 1) {
        for (size_t l = 0; l < n_layer; ++l) f(l, scratch[0]);
        return;
    }
    std::vector<std::exception_ptr> errors(n);
    std::vector<std::thread> threads;
    for (size_t t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            try {
                for (size_t l = t; l < n_layer; l += n) f(l, scratch[t]);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    for (auto &th : threads) th.join();
    for (auto &e : errors)
        if (e) std::rethrow_exception(e);
}

class KVPass {
  public:
    KVPass(uintptr_t ctx, int n_prefix, int n_head_kv, int head_dim_k, int head_dim_v, bool mrope, int rope_type,
           int n_rot, double freq_base, double freq_scale, int max_cells, int max_position, int n_threads)
        : ctx_(reinterpret_cast<llama_context *>(ctx)), n_prefix_(n_prefix), n_head_(n_head_kv), dk_(head_dim_k),
          dv_(head_dim_v), mrope_(mrope), max_cells_(max_cells), scratch_(size_t(std::max(n_threads, 1))) {
        rope_.type = rope_type;
        rope_.n_rot = n_rot;
        rope_.freq_base = freq_base;
        rope_.freq_scale = freq_scale;
        // cos/sin of every position a reindexed cache can hold, for un-rotating and re-rotating keys;
        // positions past the table (keep mode on long streams) are computed directly.
        table_n_ = std::max(max_position, 1);
        half_ = std::max(n_rot / 2, 1);
        rot_half_ = n_rot > 0 ? n_rot / 2 : 0;
        cos_.resize(size_t(table_n_) * half_);
        sin_.resize(size_t(table_n_) * half_);
        for (int p = 0; p < table_n_; ++p)
            for (int i = 0; i < half_; ++i) {
                double th = angle(p, i);
                cos_[size_t(p) * half_ + i] = float(std::cos(th));
                sin_[size_t(p) * half_ + i] = float(std::sin(th));
            }
    }

    // Portable path: copy the sequence's state into buffer A and parse it; sizes A and B on the first call.
    void read() {
        direct_ = false;
        size_t size = llama_state_seq_get_size(ctx_, 0);
        if (a_.empty()) {
            a_.resize(size);
            size_a_ = llama_state_seq_get_data(ctx_, a_.data(), size, 0);
            edge::parse_state(a_.data(), size_a_, mrope_, view_);
            check_layout();
            size_t cap = std::max(edge::state_size_for(view_, size_t(max_cells_)), size);
            a_.resize(cap);
            b_.resize(cap);
        } else {
            if (size > a_.size())
                throw std::runtime_error("KV state of " + std::to_string(size) + " bytes exceeds the pass buffer of " +
                                         std::to_string(a_.size()) + " (more cells than the budget?)");
            size_a_ = llama_state_seq_get_data(ctx_, a_.data(), a_.size(), 0);
            edge::parse_state(a_.data(), size_a_, mrope_, view_);
        }
        if (view_.cell_count > uint32_t(max_cells_))
            throw std::runtime_error("the sequence holds more cells than the budget the pass was sized for");
        size_scratch(view_.v_trans != 0);
        // Cells below n_prefix are the system prompt: never touched. The rest, by position, are the slots.
        prefix_cells_.clear();
        slot_cells_.clear();
        for (uint32_t c = 0; c < view_.cell_count; ++c)
            (view_.pos[c] < n_prefix_ ? prefix_cells_ : slot_cells_).push_back(int32_t(c));
        auto by_pos = [&](int32_t a, int32_t b) { return view_.pos[a] < view_.pos[b]; };
        std::sort(slot_cells_.begin(), slot_cells_.end(), by_pos);
        std::sort(prefix_cells_.begin(), prefix_cells_.end(), by_pos);
        src_.resize(view_.n_layer);
        for (size_t l = 0; l < view_.n_layer; ++l) {
            const auto &LV = view_.layers[l];
            LayerSrc &s = src_[l];
            s.k_type = LV.k_type;
            s.v_type = LV.v_type;
            s.k = a_.data() + LV.k_offset;
            s.v = a_.data() + LV.v_offset;
            s.k_row = LV.k_row_bytes;
            s.v_elem = ggml_type_size(ggml_type(LV.v_type));
            s.v_row = view_.v_trans ? size_t(view_.cell_count) * LV.v_elem_bytes : LV.v_row_bytes;
        }
        v_trans_ = view_.v_trans != 0;
        n_layer_ = view_.n_layer;
        state_bytes_ = size_a_;
    }

    // Whether the direct path can work on this context at all: "" if so, else why not (said once).
    std::string direct_support(KVCapture &cap) {
        cap_ = nullptr;
        if (mrope_) return "M-RoPE models keep x/y positions per cell, which the in-place pass does not rewrite";
        if (rope_.type != LLAMA_ROPE_TYPE_NORM && rope_.type != LLAMA_ROPE_TYPE_NEOX)
            return "re-rotation in place supports normal and NeoX RoPE only";
        if (cap.conflict()) return "more than one KV cache per layer (sliding-window or shared caches)";
        if (!cap.complete()) return "the evaluation callback has not seen every layer's K and V tensors";
        for (size_t l = 0; l < cap.n_layer(); ++l)
            for (ggml_tensor *t : {cap.k(l), cap.v(l)}) {
                if (!t->buffer || !ggml_backend_buffer_is_host(t->buffer) || !t->data)
                    return "the KV cache is not in host memory (GPU offload)";
                if (t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_F32)
                    return std::string("the KV cache is ") + ggml_type_name(t->type);
                if (t->ne[2] != 1 || t->ne[3] != 1) return "the KV cache has more than one stream";
                if (t->nb[1] != ggml_row_size(t->type, t->ne[0])) return "the KV tensors are not contiguous";
                if (t->ne[1] < max_cells_) return "the KV cache has fewer cells than the budget";
            }
        for (size_t l = 0; l < cap.n_layer(); ++l)
            if (cap.k(l)->ne[0] != int64_t(n_head_) * dk_ || cap.v(l)->ne[0] != int64_t(n_head_) * dv_)
                return "K or V rows do not match n_head_kv x head_dim";
        cap_ = &cap;
        verified_ = false;
        return "";
    }

    // Direct path: check that cell c holds position c for all n_prefix + n_video cells of sequence 0 and
    // point the pass at llama.cpp's tensors. Cheap at every pass (positions and cell count through the
    // public API); the first time, and after any mismatch, also against the parsed state, byte for byte.
    // Returns "" when the pass may run in place, else why not (the caller falls back to read()).
    std::string read_direct(int n_video) {
        direct_ = false;
        if (!cap_) throw std::logic_error("read_direct before a successful direct_support");
        const int total = n_prefix_ + n_video;
        llama_memory_t mem = llama_get_memory(ctx_);
        const llama_pos lo = llama_memory_seq_pos_min(mem, 0), hi = llama_memory_seq_pos_max(mem, 0);
        if (lo != 0 || hi != total - 1) {
            verified_ = false;
            return "sequence 0 spans positions [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not [0, " +
                   std::to_string(total - 1) + "]";
        }
        if (total > max_cells_) return "the sequence holds more cells than the budget the pass was sized for";
        if (verified_) {
            // get_size walks the cell metadata only: it counts the cells without copying K or V.
            const size_t size = llama_state_seq_get_size(ctx_, 0), want = edge::state_size_for(dview_, size_t(total));
            if (size != want) {
                verified_ = false;
                return "the KV state is " + std::to_string(size) + " bytes, not the " + std::to_string(want) +
                       " of " + std::to_string(total) + " cells";
            }
            state_bytes_ = size;
        } else {
            std::string why = verify_layout(total);
            if (!why.empty()) return why;
            verified_ = true;
        }
        n_layer_ = cap_->n_layer();
        v_trans_ = dview_.v_trans != 0;
        size_scratch(v_trans_);
        src_.resize(n_layer_);
        for (size_t l = 0; l < n_layer_; ++l) {
            ggml_tensor *k = cap_->k(l), *v = cap_->v(l);
            LayerSrc &s = src_[l];
            s.k_type = k->type;
            s.v_type = v->type;
            s.k = static_cast<uint8_t *>(k->data);
            s.v = static_cast<uint8_t *>(v->data);
            s.k_row = k->nb[1];
            s.v_elem = ggml_type_size(v->type);
            // transposed V (cpy_v/get_v): element (d, cell) at d * kv_size + cell
            s.v_row = v_trans_ ? size_t(v->ne[1]) * s.v_elem : v->nb[1];
        }
        prefix_cells_.resize(size_t(n_prefix_));
        std::iota(prefix_cells_.begin(), prefix_cells_.end(), 0);
        slot_cells_.resize(size_t(n_video));
        std::iota(slot_cells_.begin(), slot_cells_.end(), n_prefix_);
        direct_ = true;
        return "";
    }

    size_t n_slots() const { return slot_cells_.size(); }
    size_t n_layer() const { return n_layer_; }
    bool v_trans() const { return v_trans_; }
    std::string path() const { return direct_ ? "direct" : "portable"; }
    size_t state_bytes() const { return state_bytes_; }
    size_t buffer_bytes() const { return a_.size() + b_.size(); }

    I32Array slot_positions() const {
        I32Array out(py::ssize_t(slot_cells_.size()));
        auto o = out.mutable_unchecked<1>();
        for (size_t n = 0; n < slot_cells_.size(); ++n)
            o(py::ssize_t(n)) = direct_ ? slot_cells_[n] : view_.pos[slot_cells_[n]];  // direct: cell = position
        return out;
    }

    // [H, N, D] float32 keys / values of one layer in slot order, as stored (tests and diagnostics).
    py::array_t<float> keys(int layer) { return rows(layer, true); }
    py::array_t<float> values(int layer) { return rows(layer, false); }

    // InfiniPot-V selection (or its TaR-only / VaN-only ablations) for every (layer, head).
    // slot_frame, slot_patch, rot_pos: [L, H, N] int32 bookkeeping (frame id, patch y*nx+x, the position
    // the stored key is rotated at). Returns kept slot indices [L, H, keep], ascending.
    I32Array select(const I32Array &slot_frame, const I32Array &slot_patch, const I32Array &rot_pos, int nx, int ny,
                    int recent_min_frame, int keep, double alpha, bool pool, bool use_tar, bool use_van) {
        const size_t L = n_layer_, H = size_t(n_head_), N = slot_cells_.size(), p = size_t(nx) * ny;
        check_bookkeeping(slot_frame, L, H, N);
        check_bookkeeping(slot_patch, L, H, N);
        check_bookkeeping(rot_pos, L, H, N);
        if (keep <= 0 || size_t(keep) > N) throw std::invalid_argument("keep must be in [1, slots]");
        if (nx <= 0 || ny <= 0) throw std::invalid_argument("empty patch grid");
        const int32_t *F = slot_frame.data(), *P = slot_patch.data(), *R = rot_pos.data();
        I32Array out({py::ssize_t(L), py::ssize_t(H), py::ssize_t(keep)});
        int32_t *o = out.mutable_data();
        for (auto &S : scratch_) {
            if (S.sum.size() < H * p * dk_) S.sum.resize(H * p * dk_);
            if (S.grid.size() < p) S.grid.resize(p), S.present.resize(p);
        }
        {
            py::gil_scoped_release nogil;
            for_layers(L, scratch_, [&](size_t l, Scratch &S) {
                select_layer(S, l, F, P, R, nx, p, recent_min_frame, size_t(keep), alpha, pool ? pool_kernel(l, L) : 1,
                             use_tar, use_van, o + l * H * size_t(keep));
            });
        }
        return out;
    }

    // Write back: the prefix cells as they were, then for slot j of head h the token kept[l, h, j], at cell
    // position new_pos[j]. With rerotate, keys turn from rot_pos to new_pos. Direct path: in place, then
    // the cells after the kept ones are freed. Portable path: through B; on failure the state read last
    // goes back and an exception says so. Every check runs before the first byte moves.
    void apply(const I32Array &kept, const I32Array &new_pos, const I32Array &rot_pos, bool rerotate) {
        const size_t L = n_layer_, H = size_t(n_head_), N = slot_cells_.size();
        if (kept.ndim() != 3 || size_t(kept.shape(0)) != L || size_t(kept.shape(1)) != H)
            throw std::invalid_argument("kept must be [n_layer, n_head_kv, C]");
        const size_t C = size_t(kept.shape(2));
        if (new_pos.ndim() != 1 || size_t(new_pos.shape(0)) != C) throw std::invalid_argument("new_pos must be [C]");
        check_bookkeeping(rot_pos, L, H, N);
        const int32_t *K = kept.data(), *NPOS = new_pos.data(), *RP = rot_pos.data();
        for (size_t i = 0; i < L * H * C; ++i)
            if (K[i] < 0 || size_t(K[i]) >= N) throw std::invalid_argument("kept holds a slot out of range");
        if (rerotate && rope_.type != LLAMA_ROPE_TYPE_NORM && rope_.type != LLAMA_ROPE_TYPE_NEOX)
            throw std::runtime_error("re-rotation supports normal and NeoX RoPE only");
        if (direct_) {
            // In place, kept[j] >= j makes every move a forward copy (the source is never overwritten
            // first); that needs each head's list strictly ascending. Cell P + j keeps position P + j.
            if (!rerotate) throw std::invalid_argument("the direct path runs in reindex mode only");
            for (size_t lh = 0; lh < L * H; ++lh)
                for (size_t j = 1; j < C; ++j)
                    if (K[lh * C + j] <= K[lh * C + j - 1])
                        throw std::invalid_argument("kept slots must be strictly ascending per head");
            for (size_t j = 0; j < C; ++j)
                if (NPOS[j] != n_prefix_ + int32_t(j))
                    throw std::invalid_argument("the direct path gives slot j position n_prefix + j");
            py::gil_scoped_release nogil;
            apply_direct(K, C, NPOS, RP, N);
            return;
        }
        apply_portable(K, C, NPOS, RP, N, rerotate);
    }

    // Hand back exactly the state read last (a pass that failed half-way, or a test of the restore path).
    bool restore() { return llama_state_seq_set_data(ctx_, a_.data(), size_a_, 0) != 0; }

    // Test hook: write back a corrupted (truncated) copy of B to exercise the restore path of apply().
    void apply_truncated_for_test() {
        std::memcpy(b_.data(), a_.data(), size_a_);
        if (llama_state_seq_set_data(ctx_, b_.data(), size_a_ / 2, 0) == 0) {
            if (!restore()) throw std::runtime_error("restore failed: memory lost");
            throw std::runtime_error("writing the compressed KV state failed; the memory was restored as it was");
        }
    }

    // Test hook: rewrite sequence 0 with its video cells in reverse cell order (reverse) and/or their
    // positions moved by `shift`, K and V untouched: layouts the direct path must refuse. The model sees
    // the same memory when shift is 0 (cell order does not matter to attention).
    void relayout_for_test(bool reverse, int shift) {
        read();
        const size_t NP = prefix_cells_.size(), cc = view_.cell_count;
        std::vector<int32_t> order(prefix_cells_);
        if (reverse)
            order.insert(order.end(), slot_cells_.rbegin(), slot_cells_.rend());
        else
            order.insert(order.end(), slot_cells_.begin(), slot_cells_.end());
        const uint8_t *a = a_.data();
        uint8_t *b = b_.data();
        std::memcpy(b, a, view_.cell_offset[0]);
        size_t w = view_.cell_offset[0];
        const size_t rec = (view_.cells_end - view_.cell_offset[0]) / cc;
        for (size_t i = 0; i < cc; ++i, w += rec) {
            std::memcpy(b + w, a + view_.cell_offset[size_t(order[i])], rec);
            if (i >= NP) {
                int32_t pos = view_.pos[size_t(order[i])] + shift;
                std::memcpy(b + w, &pos, 4);
            }
        }
        std::memcpy(b + w, a + view_.cells_end, 8);
        w += 8;
        for (const auto &LV : view_.layers) {
            std::memcpy(b + w, a + LV.k_offset - 12, 12);
            w += 12;
            for (size_t i = 0; i < cc; ++i, w += LV.k_row_bytes)
                std::memcpy(b + w, a + LV.k_offset + size_t(order[i]) * LV.k_row_bytes, LV.k_row_bytes);
        }
        for (const auto &LV : view_.layers) {
            std::memcpy(b + w, a + LV.v_offset - 12, 12);
            w += 12;
            if (!view_.v_trans) {
                for (size_t i = 0; i < cc; ++i, w += LV.v_row_bytes)
                    std::memcpy(b + w, a + LV.v_offset + size_t(order[i]) * LV.v_row_bytes, LV.v_row_bytes);
                continue;
            }
            const size_t e = LV.v_elem_bytes;
            for (size_t d = 0; d < LV.n_embd_v; ++d)
                for (size_t i = 0; i < cc; ++i, w += e)
                    std::memcpy(b + w, a + LV.v_offset + (d * cc + size_t(order[i])) * e, e);
        }
        if (w != size_a_) throw std::logic_error("relayout size mismatch");
        if (llama_state_seq_set_data(ctx_, b, w, 0) == 0) throw std::runtime_error("relayout: set_data failed");
    }

  private:
    double angle(double pos, int i) const {
        return pos * rope_.freq_scale * std::pow(rope_.freq_base, -2.0 * i / rope_.n_rot);
    }

    // cos/sin of `ad` = |delta| positions for every rotated pair (table or computed into `tmp`).
    void angles(int ad, const float *&c, const float *&s, float *tmp) const {
        if (ad < table_n_) {
            c = &cos_[size_t(ad) * half_];
            s = &sin_[size_t(ad) * half_];
            return;
        }
        for (int i = 0; i < half_; ++i) {
            double th = angle(ad, i);
            tmp[i] = float(std::cos(th));
            tmp[half_ + i] = float(std::sin(th));
        }
        c = tmp;
        s = tmp + half_;
    }

    // Rotate one head's key x (stored layout) by delta positions: x <- R(delta) x. Both paths call this
    // one out-of-line copy, so a re-rotated key has the same bits whichever path moved it.
    EDGE_NOINLINE void rotate(float *__restrict x, int delta, float *__restrict tmp) const {
        if (rot_half_ == 0) return;
        const float *c, *s;
        angles(delta < 0 ? -delta : delta, c, s, tmp);
        const float sign = delta < 0 ? -1.0f : 1.0f;
        const int h = half_;
        if (rope_.type == LLAMA_ROPE_TYPE_NEOX) {
            for (int i = 0; i < h; ++i) {
                const float a = x[i], b = x[h + i], si = sign * s[i];
                x[i] = a * c[i] - b * si;
                x[h + i] = a * si + b * c[i];
            }
            return;
        }
        for (int i = 0; i < h; ++i) {  // normal RoPE: adjacent pairs
            const float a = x[2 * i], b = x[2 * i + 1], si = sign * s[i];
            x[2 * i] = a * c[i] - b * si;
            x[2 * i + 1] = a * si + b * c[i];
        }
    }

    // Cell `cell`'s keys (all heads) as float in halves layout: normal RoPE's adjacent pairs go to
    // [evens, odds] per head. Norms and dot products do not care about the order of dimensions.
    void load_keys(const LayerSrc &L, size_t cell, Scratch &S) const {
        const size_t HD = size_t(n_head_) * dk_;
        const uint8_t *src = L.k + cell * L.k_row;
        if (rope_.type == LLAMA_ROPE_TYPE_NEOX || rot_half_ == 0) return to_float(L.k_type, src, S.row.data(), HD);
        to_float(L.k_type, src, S.raw.data(), HD);
        const int h2 = rot_half_;
        for (int h = 0; h < n_head_; ++h) {
            const float *in = S.raw.data() + size_t(h) * dk_;
            float *out = S.row.data() + size_t(h) * dk_;
            for (int i = 0; i < h2; ++i) {
                out[i] = in[2 * i];
                out[h2 + i] = in[2 * i + 1];
            }
            for (int d = 2 * h2; d < dk_; ++d) out[d] = in[d];
        }
    }

    void size_scratch(bool v_trans) {
        const size_t cells = size_t(max_cells_), H = size_t(n_head_);
        const size_t hk = H * dk_, hv = H * dv_;
        for (auto &S : scratch_) {
            if (S.raw.size() >= std::max(hk, hv) && (!v_trans || S.vacc.size() >= H * cells)) continue;
            S.raw.resize(std::max(hk, hv));
            S.row.resize(std::max(hk, hv));
            S.unit.resize(size_t(dk_) * 4 + size_t(half_) * 4);
            for (auto *v : {&S.tar, &S.van}) v->resize(H * cells);
            S.pooled.resize(cells);
            S.cand.resize(cells);
            S.mark.resize(H * cells);
            S.any_recent.resize(cells);
            S.any_past.resize(cells);
            if (v_trans) {
                S.run.resize(cells);
                S.vacc.resize(H * cells);
            }
        }
        prefix_cells_.reserve(cells);
        slot_cells_.reserve(cells);
    }

    // The direct path's check against the parsed state: sequence 0 is exactly cells [0, total) holding
    // positions 0..total-1 in cell order (state_write walks cells in index order), and the blob's rows are
    // the captured tensors' rows [0, total). A shifted or permuted layout differs in some row.
    std::string verify_layout(int total) {
        std::vector<uint8_t> blob(llama_state_seq_get_size(ctx_, 0));
        blob.resize(llama_state_seq_get_data(ctx_, blob.data(), blob.size(), 0));
        try {
            edge::parse_state(blob.data(), blob.size(), mrope_, dview_);
        } catch (const std::exception &e) {
            return e.what();
        }
        state_bytes_ = blob.size();
        if (dview_.cell_count != uint32_t(total))
            return "the state has " + std::to_string(dview_.cell_count) + " cells, not " + std::to_string(total);
        for (uint32_t c = 0; c < dview_.cell_count; ++c)
            if (dview_.pos[c] != int32_t(c))
                return "the state's cell " + std::to_string(c) + " holds position " + std::to_string(dview_.pos[c]);
        if (dview_.n_layer != cap_->n_layer()) return "the state and the captured tensors disagree on the layers";
        const size_t cc = dview_.cell_count;
        for (size_t l = 0; l < dview_.n_layer; ++l) {
            const auto &LV = dview_.layers[l];
            ggml_tensor *k = cap_->k(l), *v = cap_->v(l);
            if (LV.k_type != k->type || LV.v_type != v->type || LV.k_row_bytes != k->nb[1])
                return "layer " + std::to_string(l) + ": the state's K/V types or rows differ from the tensors'";
            if (std::memcmp(blob.data() + LV.k_offset, k->data, cc * LV.k_row_bytes) != 0)
                return "layer " + std::to_string(l) + ": the state's keys are not the tensor's cells [0, " +
                       std::to_string(cc) + ")";
            const uint8_t *vd = static_cast<const uint8_t *>(v->data);
            if (!dview_.v_trans) {
                if (LV.v_row_bytes != v->nb[1] ||
                    std::memcmp(blob.data() + LV.v_offset, vd, cc * LV.v_row_bytes) != 0)
                    return "layer " + std::to_string(l) + ": the state's values are not the tensor's first cells";
                continue;
            }
            const size_t e = LV.v_elem_bytes, kv_size = size_t(v->ne[1]);
            if (e != ggml_type_size(v->type) || LV.n_embd_v != uint32_t(n_head_ * dv_))
                return "layer " + std::to_string(l) + ": the state's transposed V does not match the tensor";
            for (size_t d = 0; d < LV.n_embd_v; ++d)
                if (std::memcmp(blob.data() + LV.v_offset + d * cc * e, vd + d * kv_size * e, cc * e) != 0)
                    return "layer " + std::to_string(l) + ": the state's values are not the tensor's first cells";
        }
        return "";
    }

    void check_layout() const {
        for (const auto &L : view_.layers) {
            for (int t : {L.k_type, L.v_type})
                if (t != GGML_TYPE_F16 && t != GGML_TYPE_F32)
                    throw std::runtime_error(std::string("the KV cache is ") + ggml_type_name(ggml_type(t)) +
                                             "; compression supports f16 and f32 caches (use --cache-type f16)");
            if (L.k_row_bytes != size_t(n_head_) * dk_ * ggml_type_size(ggml_type(L.k_type)))
                throw std::runtime_error("K rows do not match n_head_kv x head_dim");
        }
    }

    static void check_bookkeeping(const I32Array &x, size_t L, size_t H, size_t N) {
        if (x.ndim() != 3 || size_t(x.shape(0)) != L || size_t(x.shape(1)) != H || size_t(x.shape(2)) != N)
            throw std::invalid_argument("bookkeeping arrays must be [n_layer, n_head_kv, n_slots] = [" +
                                        std::to_string(L) + ", " + std::to_string(H) + ", " + std::to_string(N) + "]");
    }

    static int pool_kernel(size_t l, size_t L) {
        if (4 * l < L) return 7;
        if (2 * l < L) return 5;
        if (4 * l < 3 * L) return 3;
        return 1;
    }

    // One layer: scores for all heads (each K and V row read once for every head), then per head the
    // InfiniPot-V choice.
    void select_layer(Scratch &S, size_t l, const int32_t *F, const int32_t *P, const int32_t *R, int nx, size_t p,
                      int recent_min_frame, size_t keep, double alpha, int kernel, bool use_tar, bool use_van,
                      int32_t *out) const {
        const size_t H = size_t(n_head_), N = slot_cells_.size();
        size_t r[64];
        if (H > 64) throw std::invalid_argument("more than 64 KV heads");
        for (size_t h = 0; h < H; ++h) {
            const size_t base = (l * H + h) * N;
            r[h] = mark_recent(S.mark.data() + h * N, F + base, P + base, p, recent_min_frame, l, h);
            if (keep < r[h] * p) throw std::invalid_argument("|C| is smaller than the recent frames");
        }
        if (use_tar) tar_layer(S, l, P + l * H * N, R + l * H * N, p, r);
        if (use_van) {
            van_layer(S, l);
            if (kernel > 1)
                for (size_t h = 0; h < H; ++h)
                    pool_van(S, S.van.data() + h * N, F + (l * H + h) * N, P + (l * H + h) * N, nx, p, kernel);
        }
        for (size_t h = 0; h < H; ++h)
            choose(S, h, r[h] * p, keep, alpha, use_tar, use_van, out + h * keep);
    }

    // Mark head h's slots of the recent frames (frame >= recent_min_frame); every patch of each must be
    // there, once. Returns the number of recent frames.
    size_t mark_recent(uint8_t *mark, const int32_t *frame, const int32_t *patch, size_t p, int recent_min_frame,
                       size_t l, size_t h) const {
        const size_t N = slot_cells_.size();
        size_t n_recent_tokens = 0, n_recent_frames = 0;
        int last_frame = INT32_MIN;
        for (size_t n = 0; n < N; ++n) {
            if (n > 0 && frame[n] < frame[n - 1]) throw std::logic_error("slots are not in time order");
            if (patch[n] < 0 || size_t(patch[n]) >= p) throw std::invalid_argument("patch index outside the grid");
            mark[n] = frame[n] >= recent_min_frame;
            if (!mark[n]) continue;
            if (frame[n] != last_frame) {
                last_frame = frame[n];
                ++n_recent_frames;
            }
            ++n_recent_tokens;
        }
        if (n_recent_tokens != n_recent_frames * p)
            throw std::invalid_argument("a recent frame is incomplete in layer " + std::to_string(l) + ", head " +
                                        std::to_string(h));
        return n_recent_frames;
    }

    // TaR of every past slot of every head: -(1/r) sum over recent frames of cos(k_n, k_{t', patch(n)})
    // = -(1/r) k̂_n . S_patch(n), with S_q the sum of the recent frames' unit keys (un-rotated to position
    // 0) at patch q. Two sweeps over the layer's rows: recent slots fill S, past slots take one fused
    // un-rotate-and-dot each.
    void tar_layer(Scratch &S, size_t l, const int32_t *patch, const int32_t *rpos, size_t p, const size_t *r) const {
        const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dk_);
        const LayerSrc &L = src_[l];
        std::fill(S.sum.begin(), S.sum.begin() + long(H * p * D), 0.0f);
        for (size_t n = 0; n < N; ++n) {
            uint8_t rec = 0, past = 0;
            for (size_t h = 0; h < H; ++h) (S.mark[h * N + n] ? rec : past) = 1;
            S.any_recent[n] = rec;
            S.any_past[n] = past;
        }
        float *u = S.unit.data(), *tmp = S.unit.data() + D;
        const float *c = nullptr, *s = nullptr;
        for (size_t n = 0; n < N; ++n) {
            if (!S.any_recent[n]) continue;
            load_keys(L, size_t(slot_cells_[n]), S);
            for (size_t h = 0; h < H; ++h) {
                if (!S.mark[h * N + n]) continue;
                angles(std::abs(rpos[h * N + n]), c, s, tmp);
                const float norm = std::sqrt(unrotate(S.row.data() + h * D, c, s, rot_half_, dk_, u));
                const float inv = norm > 1e-12f ? 1.0f / norm : 0.0f;  // cos = a.b / max(|a||b|, eps)
                float *sum = S.sum.data() + (h * p + size_t(patch[h * N + n])) * D;
                for (size_t d = 0; d < D; ++d) sum[d] += u[d] * inv;
            }
        }
        for (size_t n = 0; n < N; ++n) {
            if (!S.any_past[n]) continue;
            load_keys(L, size_t(slot_cells_[n]), S);
            for (size_t h = 0; h < H; ++h) {
                if (S.mark[h * N + n]) continue;
                angles(std::abs(rpos[h * N + n]), c, s, tmp);
                float n2;
                const float dot = unrotate_dot(S.row.data() + h * D, c, s,
                                               S.sum.data() + (h * p + size_t(patch[h * N + n])) * D, rot_half_, dk_, n2);
                const float norm = std::sqrt(n2);
                const float inv = norm > 1e-12f ? 1.0f / norm : 0.0f;
                S.tar[h * N + n] = -double(dot) * inv / double(r[h]);
            }
        }
    }

    // VaN of every slot of every head: one sweep over V rows, or over transposed V's dimension runs.
    void van_layer(Scratch &S, size_t l) const {
        const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dv_);
        const LayerSrc &L = src_[l];
        if (!v_trans_) {
            for (size_t n = 0; n < N; ++n) {
                to_float(L.v_type, L.v + size_t(slot_cells_[n]) * L.v_row, S.raw.data(), H * D);
                for (size_t h = 0; h < H; ++h)
                    S.van[h * N + n] = std::sqrt(double(sum_squares(S.raw.data() + h * D, int(D))));
            }
            return;
        }
        std::fill(S.vacc.begin(), S.vacc.begin() + long(H * N), 0.0f);
        const bool contiguous = N > 0 && size_t(slot_cells_[N - 1] - slot_cells_[0]) == N - 1;
        float *x = S.run.data();
        for (size_t d = 0; d < H * D; ++d) {
            const uint8_t *run = L.v + d * L.v_row;
            if (contiguous) {
                to_float(L.v_type, run + size_t(slot_cells_[0]) * L.v_elem, x, N);
            } else {
                for (size_t n = 0; n < N; ++n) to_float(L.v_type, run + size_t(slot_cells_[n]) * L.v_elem, x + n, 1);
            }
            float *acc = S.vacc.data() + (d / D) * N;
            for (size_t n = 0; n < N; ++n) acc[n] += x[n] * x[n];
        }
        for (size_t i = 0; i < H * N; ++i) S.van[i] = std::sqrt(double(S.vacc[i]));
    }

    // Mean of VaN over the k x k window of the same frame, over the slots this head still holds.
    void pool_van(Scratch &S, double *van, const int32_t *frame, const int32_t *patch, int nx, size_t p,
                  int kernel) const {
        const size_t N = slot_cells_.size();
        const int half = kernel / 2, ny = int(p) / nx;
        size_t start = 0;
        while (start < N) {
            size_t end = start;
            while (end < N && frame[end] == frame[start]) ++end;
            for (size_t n = start; n < end; ++n) {
                S.grid[size_t(patch[n])] = van[n];
                S.present[size_t(patch[n])] = 1;
            }
            for (size_t n = start; n < end; ++n) {
                const int x = patch[n] % nx, y = patch[n] / nx;
                double s = 0;
                int cnt = 0;
                for (int yy = std::max(0, y - half); yy <= std::min(ny - 1, y + half); ++yy)
                    for (int xx = std::max(0, x - half); xx <= std::min(nx - 1, x + half); ++xx)
                        if (S.present[size_t(yy * nx + xx)]) {
                            s += S.grid[size_t(yy * nx + xx)];
                            ++cnt;
                        }
                S.pooled[n] = s / cnt;
            }
            for (size_t n = start; n < end; ++n) S.present[size_t(patch[n])] = 0;
            start = end;
        }
        std::copy(S.pooled.begin(), S.pooled.begin() + long(N), van);
    }

    // Head h's choice from its scores: the recent slots (marked), alpha |C| by TaR, the rest by VaN.
    void choose(Scratch &S, size_t h, size_t rp, size_t keep, double alpha, bool use_tar, bool use_van,
                int32_t *out) const {
        const size_t N = slot_cells_.size();
        uint8_t *mark = S.mark.data() + h * N;
        const double *tar = S.tar.data() + h * N, *van = S.van.data() + h * N;
        Scored *cand = S.cand.data();
        const double *first = use_tar ? tar : van;
        size_t nc = 0;
        for (size_t n = 0; n < N; ++n)
            if (!mark[n]) cand[nc++] = {first[n], int32_t(n)};
        size_t n_kept_past = keep - rp;
        if (use_tar && use_van) {
            long n_tar = long(std::floor(alpha * double(keep))) - long(rp);
            if (n_tar < 0) throw std::invalid_argument("alpha * |C| must cover the recent frames");
            size_t nt = std::min(size_t(n_tar), nc);
            top_k(cand, nc, nt);
            for (size_t i = 0; i < nt; ++i) mark[size_t(cand[i].slot)] = 1;  // protected by TaR
            // The rest of the room goes to the highest VaN among the unprotected.
            size_t m = 0;
            for (size_t i = nt; i < nc; ++i) cand[m++] = {van[cand[i].slot], cand[i].slot};
            nc = m;
            n_kept_past -= nt;
        }
        top_k(cand, nc, n_kept_past);
        for (size_t i = 0; i < std::min(n_kept_past, nc); ++i) mark[size_t(cand[i].slot)] = 1;
        size_t k = 0;
        for (size_t n = 0; n < N; ++n)
            if (mark[n]) out[k++] = int32_t(n);
        if (k != keep) throw std::logic_error("selection kept " + std::to_string(k) + " slots, not " + std::to_string(keep));
    }

    // In place: for every layer and head, slot j <- kept[j] (a forward move, kept[j] >= j), keys turned
    // from their stored rotation to position P + j on the way; then the cells after P + C are freed.
    // Nothing here can fail: apply() checked every input before.
    void apply_direct(const int32_t *K, size_t C, const int32_t *NPOS, const int32_t *RP, size_t N) {
        const size_t L = n_layer_, H = size_t(n_head_), P0 = size_t(n_prefix_);
        for_layers(L, scratch_, [&](size_t l, Scratch &S) {
            const LayerSrc &Ls = src_[l];
            const size_t kb = Ls.k_row / H, D = size_t(dk_);
            float *x = S.raw.data(), *tmp = S.unit.data();
            for (size_t j = 0; j < C; ++j) {
                uint8_t *dst = Ls.k + (P0 + j) * Ls.k_row;
                for (size_t h = 0; h < H; ++h) {
                    const size_t s = size_t(K[(l * H + h) * C + j]);
                    const int delta = NPOS[j] - RP[(l * H + h) * N + s];
                    if (s == j && delta == 0) continue;
                    const uint8_t *from = Ls.k + (P0 + s) * Ls.k_row + h * kb;
                    if (delta == 0) {
                        std::memcpy(dst + h * kb, from, kb);
                        continue;
                    }
                    to_float(Ls.k_type, from, x, D);
                    rotate(x, delta, tmp);
                    from_float(Ls.k_type, x, dst + h * kb, D);
                }
            }
            if (!v_trans_) {
                const size_t vb = Ls.v_row / H;
                for (size_t j = 0; j < C; ++j)
                    for (size_t h = 0; h < H; ++h) {
                        const size_t s = size_t(K[(l * H + h) * C + j]);
                        if (s != j) std::memcpy(Ls.v + (P0 + j) * Ls.v_row + h * vb, Ls.v + (P0 + s) * Ls.v_row + h * vb, vb);
                    }
                return;
            }
            const size_t Dv = size_t(dv_);
            auto runs = [&](auto elem) {
                using T = decltype(elem);
                for (size_t d = 0; d < H * Dv; ++d) {
                    T *run = reinterpret_cast<T *>(Ls.v + d * Ls.v_row) + P0;
                    const int32_t *kh = K + (l * H + d / Dv) * C;
                    for (size_t j = 0; j < C; ++j) run[j] = run[kh[j]];
                }
            };
            if (Ls.v_elem == 2)
                runs(uint16_t{});
            else
                runs(uint32_t{});
        });
        llama_memory_seq_rm(llama_get_memory(ctx_), 0, n_prefix_ + llama_pos(C), -1);
        state_bytes_ = edge::state_size_for(dview_, P0 + C);
    }

    void apply_portable(const int32_t *K, size_t C, const int32_t *NPOS, const int32_t *RP, size_t N, bool rerotate) {
        const size_t L = n_layer_, NP = prefix_cells_.size(), cells = NP + C;
        const size_t out_size = edge::state_size_for(view_, cells);
        if (out_size > b_.size()) throw std::runtime_error("compressed state exceeds the pass buffer");

        py::gil_scoped_release nogil;
        uint8_t *b = b_.data();
        const uint8_t *a = a_.data();
        size_t w = 0;
        auto put = [&](const void *src, size_t n) { std::memcpy(b + w, src, n); w += n; };
        auto put32 = [&](uint32_t v) { put(&v, 4); };
        put32(edge::kStateMagic);
        put(&view_.seq_id, 4);
        put32(1);
        put32(uint32_t(cells));
        const size_t rec = (view_.cells_end - view_.cell_offset[0]) / view_.cell_count;
        for (size_t i = 0; i < NP; ++i) put(a + view_.cell_offset[prefix_cells_[i]], rec);
        for (size_t j = 0; j < C; ++j) {
            std::memcpy(b + w, a + view_.cell_offset[slot_cells_[K[j]]], rec);  // head (0, 0)'s token: seq ids
            std::memcpy(b + w, &NPOS[j], 4);
            w += rec;
        }
        put32(view_.v_trans);
        put32(view_.n_layer);
        // Where each layer's K and V go in B, so that workers can write their layers independently.
        std::vector<size_t> &k_at = k_at_, &v_at = v_at_;
        k_at.resize(L);
        v_at.resize(L);
        for (size_t l = 0; l < L; ++l) {
            k_at[l] = w;
            w += 12 + view_.layers[l].k_row_bytes * cells;
        }
        for (size_t l = 0; l < L; ++l) {
            const auto &LV = view_.layers[l];
            v_at[l] = w;
            w += view_.v_trans ? 12 + size_t(LV.v_elem_bytes) * LV.n_embd_v * cells : 12 + LV.v_row_bytes * cells;
        }
        if (w != out_size) throw std::logic_error("compressed state size mismatch");
        for_layers(L, scratch_, [&](size_t l, Scratch &S) {
            write_keys(l, b + k_at[l], K, C, NPOS, RP, N, rerotate, S);
            write_values(l, b + v_at[l], K, C);
        });
        if (llama_state_seq_set_data(ctx_, b, w, 0) == 0) {
            // llama.cpp removed the sequence before failing: put the untouched original back.
            if (llama_state_seq_set_data(ctx_, a, size_a_, 0) == 0)
                throw std::runtime_error("writing the compressed KV state failed and so did restoring it: memory lost");
            throw std::runtime_error("writing the compressed KV state failed; the memory was restored as it was");
        }
        state_bytes_ = w;
    }

    // Layer l's K section of B: header, the prefix rows, then row j = head h's kept token, re-rotated if asked.
    void write_keys(size_t l, uint8_t *out, const int32_t *K, size_t C, const int32_t *NPOS, const int32_t *RP,
                    size_t N, bool rerotate, Scratch &S) const {
        const auto &LV = view_.layers[l];
        const size_t H = size_t(n_head_), row = LV.k_row_bytes, hb = row / H, D = size_t(dk_);
        const uint8_t *src = a_.data() + LV.k_offset;
        std::memcpy(out, &LV.k_type, 4);
        std::memcpy(out + 4, &LV.k_row_bytes, 8);
        out += 12;
        for (int32_t c : prefix_cells_) {
            std::memcpy(out, src + size_t(c) * row, row);
            out += row;
        }
        float *x = S.raw.data(), *tmp = S.unit.data();
        for (size_t j = 0; j < C; ++j, out += row)
            for (size_t h = 0; h < H; ++h) {
                const int32_t slot = K[(l * H + h) * C + j];
                const uint8_t *from = src + size_t(slot_cells_[slot]) * row + h * hb;
                const int delta = NPOS[j] - RP[(l * H + h) * N + slot];
                if (!rerotate || delta == 0) {  // bit-exact when nothing turns
                    std::memcpy(out + h * hb, from, hb);
                    continue;
                }
                to_float(LV.k_type, from, x, D);
                rotate(x, delta, tmp);
                from_float(LV.k_type, x, out + h * hb, D);
            }
    }

    // Layer l's V section of B: rows per head like K, or (transposed V) each dimension's run of kept cells.
    void write_values(size_t l, uint8_t *out, const int32_t *K, size_t C) const {
        const auto &LV = view_.layers[l];
        const size_t H = size_t(n_head_);
        const uint8_t *src = a_.data() + LV.v_offset;
        std::memcpy(out, &LV.v_type, 4);
        if (!view_.v_trans) {
            const size_t row = LV.v_row_bytes, hb = row / H;
            std::memcpy(out + 4, &LV.v_row_bytes, 8);
            out += 12;
            for (int32_t c : prefix_cells_) {
                std::memcpy(out, src + size_t(c) * row, row);
                out += row;
            }
            for (size_t j = 0; j < C; ++j, out += row)
                for (size_t h = 0; h < H; ++h)
                    std::memcpy(out + h * hb, src + size_t(slot_cells_[K[(l * H + h) * C + j]]) * row + h * hb, hb);
            return;
        }
        std::memcpy(out + 4, &LV.v_elem_bytes, 4);
        std::memcpy(out + 8, &LV.n_embd_v, 4);
        out += 12;
        const size_t cc = view_.cell_count, dv = LV.n_embd_v / H;
        auto runs = [&](auto elem) {
            using T = decltype(elem);
            T *o = reinterpret_cast<T *>(out);
            for (size_t d = 0; d < LV.n_embd_v; ++d) {
                const T *run = reinterpret_cast<const T *>(src) + d * cc;
                for (int32_t c : prefix_cells_) *o++ = run[c];
                const int32_t *kh = K + (l * H + d / dv) * C;
                for (size_t j = 0; j < C; ++j) *o++ = run[slot_cells_[size_t(kh[j])]];
            }
        };
        if (LV.v_elem_bytes == 2)
            runs(uint16_t{});
        else
            runs(uint32_t{});
    }

    py::array_t<float> rows(int layer, bool keys) {
        if (layer < 0 || size_t(layer) >= n_layer_) throw std::out_of_range("layer");
        const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(keys ? dk_ : dv_);
        const LayerSrc &L = src_[size_t(layer)];
        py::array_t<float> out({py::ssize_t(H), py::ssize_t(N), py::ssize_t(D)});
        float *o = out.mutable_data();
        std::vector<float> row(H * D);
        for (size_t n = 0; n < N; ++n) {
            const size_t c = size_t(slot_cells_[n]);
            if (keys || !v_trans_) {
                to_float(keys ? L.k_type : L.v_type, (keys ? L.k + c * L.k_row : L.v + c * L.v_row), row.data(), H * D);
            } else {
                for (size_t d = 0; d < H * D; ++d) to_float(L.v_type, L.v + d * L.v_row + c * L.v_elem, &row[d], 1);
            }
            for (size_t h = 0; h < H; ++h) std::memcpy(o + (h * N + n) * D, row.data() + h * D, D * sizeof(float));
        }
        return out;
    }

    llama_context *ctx_;
    int n_prefix_, n_head_, dk_, dv_;
    bool mrope_;
    int max_cells_;
    Rope rope_;
    int table_n_ = 1, half_ = 1, rot_half_ = 0;
    std::vector<float> cos_, sin_;
    // portable path
    std::vector<uint8_t> a_, b_;
    size_t size_a_ = 0;
    StateView view_;
    std::vector<size_t> k_at_, v_at_;
    // direct path
    KVCapture *cap_ = nullptr;
    StateView dview_;  // the layout of the last verified state (metadata only; its bytes are gone)
    bool verified_ = false;
    // this pass, either path
    bool direct_ = false, v_trans_ = false;
    size_t n_layer_ = 0, state_bytes_ = 0;
    std::vector<LayerSrc> src_;
    std::vector<int32_t> prefix_cells_, slot_cells_;
    std::vector<Scratch> scratch_;
};

PYBIND11_MODULE(_native, m) {
    m.doc() = "edge-runtime's KV compression pass over llama.cpp's KV cache (InfiniPot-V).";
    py::class_<KVCapture>(m, "KVCapture")
        .def(py::init<int>(), py::arg("n_layer"))
        .def_property_readonly("callback", &KVCapture::callback)
        .def_property_readonly("user_data", &KVCapture::user_data)
        .def_property_readonly("complete", &KVCapture::complete)
        .def("describe", &KVCapture::describe);
    py::class_<KVPass>(m, "KVPass")
        .def(py::init<uintptr_t, int, int, int, int, bool, int, int, double, double, int, int, int>(), py::arg("ctx"),
             py::arg("n_prefix"), py::arg("n_head_kv"), py::arg("head_dim_k"), py::arg("head_dim_v"),
             py::arg("mrope"), py::arg("rope_type"), py::arg("n_rot"), py::arg("freq_base"), py::arg("freq_scale"),
             py::arg("max_cells"), py::arg("max_position"), py::arg("n_threads") = 1)
        .def("read", &KVPass::read, py::call_guard<py::gil_scoped_release>())
        // The pass keeps a pointer to the capture: keep the capture alive while the pass lives.
        .def("direct_support", &KVPass::direct_support, py::arg("capture"), py::keep_alive<1, 2>())
        .def("read_direct", &KVPass::read_direct, py::arg("n_video"), py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("path", &KVPass::path)
        .def_property_readonly("n_slots", &KVPass::n_slots)
        .def_property_readonly("n_layer", &KVPass::n_layer)
        .def_property_readonly("v_trans", &KVPass::v_trans)
        .def_property_readonly("state_bytes", &KVPass::state_bytes)
        .def_property_readonly("buffer_bytes", &KVPass::buffer_bytes)
        .def("slot_positions", &KVPass::slot_positions)
        .def("keys", &KVPass::keys)
        .def("values", &KVPass::values)
        .def("select", &KVPass::select, py::arg("slot_frame"), py::arg("slot_patch"), py::arg("rot_pos"),
             py::arg("nx"), py::arg("ny"), py::arg("recent_min_frame"), py::arg("keep"), py::arg("alpha"),
             py::arg("pool"), py::arg("use_tar"), py::arg("use_van"))
        .def("apply", &KVPass::apply, py::arg("kept"), py::arg("new_pos"), py::arg("rot_pos"), py::arg("rerotate"))
        .def("restore", &KVPass::restore)
        .def("apply_truncated_for_test", &KVPass::apply_truncated_for_test)
        .def("relayout_for_test", &KVPass::relayout_for_test, py::arg("reverse"), py::arg("shift"));
}
