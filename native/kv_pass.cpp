// The compression pass over llama.cpp's KV cache, in place of sequence 0.
//
// One pass: copy the sequence's state out (llama_state_seq_get_data) into buffer A, score and select
// per (layer, KV head), gather the kept rows of every head into buffer B with rewritten cell records
// (and keys re-rotated to their new positions in reindex mode), and hand B back
// (llama_state_seq_set_data). llama.cpp wipes the sequence when set_data fails; A is untouched then and
// goes back instead. Both buffers and all scratch are sized once for the budget; a pass allocates
// nothing. This is the portable path: llama.cpp copies the state to host memory for any backend.
//
// Method: InfiniPot-V, https://arxiv.org/abs/2506.15745 (TaR on keys, VaN on values, per layer and head).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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

#include "ggml.h"
#include "kv_state.hpp"
#include "llama.h"

namespace py = pybind11;
using edge::StateView;

namespace {

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Rotary embedding as llama.cpp applies it to keys (normal: adjacent pairs; NeoX: halves).
struct Rope {
    int type = LLAMA_ROPE_TYPE_NORM;
    int n_rot = 0;
    double freq_base = 10000.0;
    double freq_scale = 1.0;
};

// "highest score first, ties: lower slot index first": the contract the NumPy reference shares.
struct ByScore {
    const double *score;
    bool operator()(int32_t a, int32_t b) const {
        return score[a] > score[b] || (score[a] == score[b] && a < b);
    }
};

// Keep the k best of idx[0..n) (by ByScore) in idx[0..k), in any order.
void top_k(int32_t *idx, size_t n, size_t k, const double *score) {
    if (k >= n) return;
    std::nth_element(idx, idx + k, idx + n, ByScore{score});
}

}  // namespace

// f16 <-> f32 for whole head slices: the hardware conversions where the build CPU has them (x86 F16C,
// Arm NEON), ggml's scalar ones otherwise. These run for every key and value of a pass.
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


// Everything one worker needs for one layer, sized once (for the budget) and reused by every pass.
struct Scratch {
    std::vector<float> vf;              // a transposed V layer as float, [n_embd_v][cells]
    std::vector<float> unit;            // one un-rotated key, then angle scratch
    std::vector<float> row;             // one row (all heads) as float
    std::vector<float> sum;             // [p][D] sums of the recent frames' unit keys
    std::vector<double> tar, van, pooled, grid;
    std::vector<int32_t> idx;
    std::vector<uint8_t> mark, present;
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
        cos_.resize(size_t(table_n_) * half_);
        sin_.resize(size_t(table_n_) * half_);
        for (int p = 0; p < table_n_; ++p)
            for (int i = 0; i < half_; ++i) {
                double th = angle(p, i);
                cos_[size_t(p) * half_ + i] = float(std::cos(th));
                sin_[size_t(p) * half_ + i] = float(std::sin(th));
            }
    }

    // Copy the sequence's state into buffer A and parse it; sizes every buffer on the first call.
    void read() {
        size_t size = llama_state_seq_get_size(ctx_, 0);
        if (a_.empty()) {
            a_.resize(size);
            size_a_ = llama_state_seq_get_data(ctx_, a_.data(), size, 0);
            edge::parse_state(a_.data(), size_a_, mrope_, view_);
            check_layout();
            size_t cap = std::max(edge::state_size_for(view_, size_t(max_cells_)), size);
            a_.resize(cap);
            b_.resize(cap);
            size_t cells = size_t(max_cells_), hk = size_t(n_head_) * dk_, hv = size_t(n_head_) * dv_;
            for (auto &S : scratch_) {
                if (view_.v_trans) S.vf.resize(cells * hv);
                S.unit.resize(size_t(dk_) * 4 + size_t(half_) * 4);
                S.row.resize(std::max(hk, hv));
                for (auto *v : {&S.tar, &S.van, &S.pooled}) v->resize(cells);
                S.idx.resize(cells);
                S.mark.resize(cells);
            }
            view_.pos.reserve(cells);
            view_.cell_offset.reserve(cells);
            prefix_cells_.reserve(cells);
            slot_cells_.reserve(cells);
        } else {
            if (size > a_.size())
                throw std::runtime_error("KV state of " + std::to_string(size) + " bytes exceeds the pass buffer of " +
                                         std::to_string(a_.size()) + " (more cells than the budget?)");
            size_a_ = llama_state_seq_get_data(ctx_, a_.data(), a_.size(), 0);
            edge::parse_state(a_.data(), size_a_, mrope_, view_);
        }
        if (view_.cell_count > uint32_t(max_cells_))
            throw std::runtime_error("the sequence holds more cells than the budget the pass was sized for");
        // Cells below n_prefix are the system prompt: never touched. The rest, by position, are the slots.
        prefix_cells_.clear();
        slot_cells_.clear();
        for (uint32_t c = 0; c < view_.cell_count; ++c)
            (view_.pos[c] < n_prefix_ ? prefix_cells_ : slot_cells_).push_back(int32_t(c));
        auto by_pos = [&](int32_t a, int32_t b) { return view_.pos[a] < view_.pos[b]; };
        std::sort(slot_cells_.begin(), slot_cells_.end(), by_pos);
        std::sort(prefix_cells_.begin(), prefix_cells_.end(), by_pos);
    }

    size_t n_slots() const { return slot_cells_.size(); }
    size_t n_layer() const { return view_.n_layer; }
    bool v_trans() const { return view_.v_trans != 0; }
    size_t state_bytes() const { return size_a_; }
    size_t buffer_bytes() const { return a_.size() + b_.size(); }

    I32Array slot_positions() const {
        I32Array out(py::ssize_t(slot_cells_.size()));
        auto o = out.mutable_unchecked<1>();
        for (size_t n = 0; n < slot_cells_.size(); ++n) o(py::ssize_t(n)) = view_.pos[slot_cells_[n]];
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
        const size_t L = view_.n_layer, H = size_t(n_head_), N = slot_cells_.size(), p = size_t(nx) * ny;
        check_bookkeeping(slot_frame, L, H, N);
        check_bookkeeping(slot_patch, L, H, N);
        check_bookkeeping(rot_pos, L, H, N);
        if (keep <= 0 || size_t(keep) > N) throw std::invalid_argument("keep must be in [1, slots]");
        if (nx <= 0 || ny <= 0) throw std::invalid_argument("empty patch grid");
        const int32_t *F = slot_frame.data(), *P = slot_patch.data(), *R = rot_pos.data();
        I32Array out({py::ssize_t(L), py::ssize_t(H), py::ssize_t(keep)});
        int32_t *o = out.mutable_data();
        for (auto &S : scratch_) {
            if (S.sum.size() < p * dk_) S.sum.resize(p * dk_);
            if (S.grid.size() < p) S.grid.resize(p), S.present.resize(p);
        }
        {
            py::gil_scoped_release nogil;
            for_layers(L, scratch_, [&](size_t l, Scratch &S) {
                if (use_van && view_.v_trans) layer_to_float(l, false, S.vf.data());  // strided otherwise
                const int kernel = pool ? pool_kernel(l, L) : 1;
                for (size_t h = 0; h < H; ++h) {
                    const size_t base = (l * H + h) * N;
                    select_head(S, l, h, F + base, P + base, R + base, nx, p, recent_min_frame, size_t(keep), alpha,
                                kernel, use_tar, use_van, o + (l * H + h) * size_t(keep));
                }
            });
        }
        return out;
    }

    // Write back: the prefix cells as they were, then for slot j of head h the token kept[l, h, j], at cell
    // position new_pos[j]. With rerotate, keys turn from rot_pos to new_pos. On failure the state read
    // last goes back and an exception says so.
    void apply(const I32Array &kept, const I32Array &new_pos, const I32Array &rot_pos, bool rerotate) {
        const size_t L = view_.n_layer, H = size_t(n_head_), N = slot_cells_.size();
        if (kept.ndim() != 3 || size_t(kept.shape(0)) != L || size_t(kept.shape(1)) != H)
            throw std::invalid_argument("kept must be [n_layer, n_head_kv, C]");
        const size_t C = size_t(kept.shape(2)), NP = prefix_cells_.size(), cells = NP + C;
        if (new_pos.ndim() != 1 || size_t(new_pos.shape(0)) != C) throw std::invalid_argument("new_pos must be [C]");
        check_bookkeeping(rot_pos, L, H, N);
        const int32_t *K = kept.data(), *NPOS = new_pos.data(), *RP = rot_pos.data();
        for (size_t i = 0; i < L * H * C; ++i)
            if (K[i] < 0 || size_t(K[i]) >= N) throw std::invalid_argument("kept holds a slot out of range");
        if (rerotate && rope_.type != LLAMA_ROPE_TYPE_NORM && rope_.type != LLAMA_ROPE_TYPE_NEOX)
            throw std::runtime_error("re-rotation supports normal and NeoX RoPE only");
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

    // Rotate x in "halves" layout (pair i = x[i], x[i + half]) by delta positions. Plain loops that the
    // compiler vectorises: this runs for every slot of every head in a pass.
    void rotate_halves(float *x, int delta, float *tmp) const {
        const float *c, *s;
        angles(delta < 0 ? -delta : delta, c, s, tmp);
        const float sign = delta < 0 ? -1.0f : 1.0f;
        float *lo = x, *hi = x + half_;
        for (int i = 0; i < half_; ++i) {
            const float a = lo[i], b = hi[i], si = sign * s[i];
            lo[i] = a * c[i] - b * si;
            hi[i] = a * si + b * c[i];
        }
    }

    // Normal RoPE rotates adjacent pairs; moving even dims to the front and odd dims after them turns it
    // into the halves layout. Norms and dot products do not care about the order of dimensions.
    void to_halves(const float *in, float *out) const {
        if (rope_.type == LLAMA_ROPE_TYPE_NEOX) {
            std::memcpy(out, in, size_t(dk_) * sizeof(float));
            return;
        }
        for (int i = 0; i < half_; ++i) {
            out[i] = in[2 * i];
            out[half_ + i] = in[2 * i + 1];
        }
        for (int d = 2 * half_; d < dk_; ++d) out[d] = in[d];
    }

    // Rotate one head's key x (stored layout) by delta positions: x <- R(delta) x.
    void rotate(float *x, int delta, float *tmp) const {
        if (rope_.type == LLAMA_ROPE_TYPE_NEOX) return rotate_halves(x, delta, tmp);
        float *h = tmp + 2 * half_;  // after the angle scratch
        to_halves(x, h);
        rotate_halves(h, delta, tmp);
        for (int i = 0; i < half_; ++i) {
            x[2 * i] = h[i];
            x[2 * i + 1] = h[half_ + i];
        }
    }

    static void to_float(int type, const uint8_t *src, float *dst, size_t n) {
        if (type == GGML_TYPE_F16)
            f16_to_f32(reinterpret_cast<const uint16_t *>(src), dst, n);
        else
            std::memcpy(dst, src, n * 4);
    }

    static void from_float(int type, const float *src, uint8_t *dst, size_t n) {
        if (type == GGML_TYPE_F16)
            f32_to_f16(src, reinterpret_cast<uint16_t *>(dst), n);
        else
            std::memcpy(dst, src, n * 4);
    }

    // One layer's whole K (or V) block as float, in blob layout: [cells][H*D] (V transposed: [n_embd_v][cells]).
    void layer_to_float(size_t l, bool keys, float *out) const {
        const auto &LV = view_.layers[l];
        const size_t cc = view_.cell_count;
        if (keys) return to_float(LV.k_type, a_.data() + LV.k_offset, out, cc * size_t(n_head_) * dk_);
        to_float(LV.v_type, a_.data() + LV.v_offset, out, cc * size_t(n_head_) * dv_);
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

    void select_head(Scratch &S, size_t l, size_t h, const int32_t *frame, const int32_t *patch, const int32_t *rpos,
                     int nx, size_t p, int recent_min_frame, size_t keep, double alpha, int kernel, bool use_tar,
                     bool use_van, int32_t *out) const {
        const size_t N = slot_cells_.size(), D = size_t(dk_);
        // The recent frames: every patch of each must be here, once.
        size_t n_recent_tokens = 0;
        int n_recent_frames = 0, last_frame = INT32_MIN;
        for (size_t n = 0; n < N; ++n) {
            if (n > 0 && frame[n] < frame[n - 1]) throw std::logic_error("slots are not in time order");
            if (patch[n] < 0 || size_t(patch[n]) >= p) throw std::invalid_argument("patch index outside the grid");
            S.mark[n] = 0;
            if (frame[n] < recent_min_frame) continue;
            if (frame[n] != last_frame) {
                last_frame = frame[n];
                ++n_recent_frames;
            }
            S.mark[n] = 1;
            ++n_recent_tokens;
        }
        if (n_recent_tokens != size_t(n_recent_frames) * p)
            throw std::invalid_argument("a recent frame is incomplete in layer " + std::to_string(l) + ", head " +
                                        std::to_string(h));
        const size_t r = size_t(n_recent_frames), rp = r * p;
        if (keep < rp) throw std::invalid_argument("|C| is smaller than the recent frames");

        // TaR: -(1/r) sum over recent frames of cos(k_n, k_{t', patch(n)}) = -(1/r) k̂_n . S_patch(n),
        // with S_q the sum of the recent frames' unit keys at patch q: one dot product per slot.
        if (use_tar) {
            std::fill(S.sum.begin(), S.sum.begin() + long(p * D), 0.0f);
            const auto &LV = view_.layers[l];
            const uint8_t *kbase = a_.data() + LV.k_offset + h * (LV.k_row_bytes / size_t(n_head_));
            float *raw = S.row.data(), *u = S.unit.data(), *tmp = S.unit.data() + D;
            // The key of slot n, un-rotated to position 0, in halves layout; returns 1 / max(|k|, eps).
            auto unit_key = [&](size_t n) {
                to_float(LV.k_type, kbase + size_t(slot_cells_[n]) * LV.k_row_bytes, raw, D);
                to_halves(raw, u);
                if (rope_.n_rot > 0 && rpos[n] != 0) rotate_halves(u, -rpos[n], tmp);
                float norm = 0;
                for (size_t d = 0; d < D; ++d) norm += u[d] * u[d];
                norm = std::sqrt(norm);
                return norm > 1e-12f ? 1.0f / norm : 0.0f;  // cos = a.b / max(|a||b|, eps)
            };
            for (size_t n = 0; n < N; ++n) {
                if (!S.mark[n]) continue;
                const float inv = unit_key(n);
                float *sum = S.sum.data() + size_t(patch[n]) * D;
                for (size_t d = 0; d < D; ++d) sum[d] += u[d] * inv;
            }
            for (size_t n = 0; n < N; ++n) {
                if (S.mark[n]) continue;
                const float inv = unit_key(n);
                const float *sum = S.sum.data() + size_t(patch[n]) * D;
                float dot = 0;
                for (size_t d = 0; d < D; ++d) dot += u[d] * sum[d];
                S.tar[n] = -double(dot) * inv / double(r);
            }
        }
        if (use_van) {
            for (size_t n = 0; n < N; ++n) S.van[n] = value_norm(S, l, h, size_t(slot_cells_[n]));
            if (kernel > 1) pool_van(S, frame, patch, nx, p, kernel);
        }

        // Candidates: the past (non-recent) slots.
        size_t nc = 0;
        for (size_t n = 0; n < N; ++n)
            if (!S.mark[n]) S.idx[nc++] = int32_t(n);
        size_t n_kept_past = keep - rp;
        if (use_tar && use_van) {
            long n_tar = long(std::floor(alpha * double(keep))) - long(rp);
            if (n_tar < 0) throw std::invalid_argument("alpha * |C| must cover the recent frames");
            size_t nt = std::min(size_t(n_tar), nc);
            top_k(S.idx.data(), nc, nt, S.tar.data());
            for (size_t i = 0; i < nt; ++i) S.mark[size_t(S.idx[i])] = 1;  // protected by TaR
            // The rest of the room goes to the highest VaN among the unprotected.
            std::copy(S.idx.begin() + long(nt), S.idx.begin() + long(nc), S.idx.begin());
            nc -= nt;
            n_kept_past -= nt;
            top_k(S.idx.data(), nc, n_kept_past, S.van.data());
        } else {
            top_k(S.idx.data(), nc, n_kept_past, use_tar ? S.tar.data() : S.van.data());
        }
        for (size_t i = 0; i < std::min(n_kept_past, nc); ++i) S.mark[size_t(S.idx[i])] = 1;
        size_t k = 0;
        for (size_t n = 0; n < N; ++n)
            if (S.mark[n]) out[k++] = int32_t(n);
        if (k != keep) throw std::logic_error("selection kept " + std::to_string(k) + " slots, not " + std::to_string(keep));
    }

    double value_norm(Scratch &S, size_t l, size_t h, size_t cell) const {
        const size_t D = size_t(dv_);
        float sum = 0;
        if (!view_.v_trans) {
            const auto &LV = view_.layers[l];
            float *v = S.row.data();
            to_float(LV.v_type, a_.data() + LV.v_offset + cell * LV.v_row_bytes + h * (LV.v_row_bytes / size_t(n_head_)),
                     v, D);
            for (size_t d = 0; d < D; ++d) sum += v[d] * v[d];
        } else {
            const size_t cc = view_.cell_count;
            for (size_t d = h * D; d < (h + 1) * D; ++d) {
                const float v = S.vf[d * cc + cell];
                sum += v * v;
            }
        }
        return std::sqrt(double(sum));
    }

    // Mean of VaN over the k x k window of the same frame, over the slots this head still holds.
    void pool_van(Scratch &S, const int32_t *frame, const int32_t *patch, int nx, size_t p, int kernel) const {
        const size_t N = slot_cells_.size();
        const int half = kernel / 2, ny = int(p) / nx;
        size_t start = 0;
        while (start < N) {
            size_t end = start;
            while (end < N && frame[end] == frame[start]) ++end;
            for (size_t n = start; n < end; ++n) {
                S.grid[size_t(patch[n])] = S.van[n];
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
        std::copy(S.pooled.begin(), S.pooled.begin() + long(N), S.van.begin());
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
        for (size_t j = 0; j < C; ++j, out += row) {
            bool turned = false;
            for (size_t h = 0; h < H; ++h) {
                const int32_t slot = K[(l * H + h) * C + j];
                const uint8_t *from = src + size_t(slot_cells_[slot]) * row + h * hb;
                const int delta = NPOS[j] - RP[(l * H + h) * N + slot];
                float *x = S.row.data() + h * D;
                to_float(LV.k_type, from, x, D);
                if (rerotate && delta != 0) {
                    rotate(x, delta, S.unit.data());
                    turned = true;
                }
            }
            if (turned) {
                from_float(LV.k_type, S.row.data(), out, H * D);
            } else {  // bit-exact when nothing turns
                for (size_t h = 0; h < H; ++h) {
                    const int32_t slot = K[(l * H + h) * C + j];
                    std::memcpy(out + h * hb, src + size_t(slot_cells_[slot]) * row + h * hb, hb);
                }
            }
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
        if (layer < 0 || size_t(layer) >= view_.n_layer) throw std::out_of_range("layer");
        const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(keys ? dk_ : dv_);
        const size_t cc = view_.cell_count;
        std::vector<float> all(cc * H * D);
        layer_to_float(size_t(layer), keys, all.data());
        py::array_t<float> out({py::ssize_t(H), py::ssize_t(N), py::ssize_t(D)});
        float *o = out.mutable_data();
        for (size_t h = 0; h < H; ++h)
            for (size_t n = 0; n < N; ++n) {
                const size_t c = size_t(slot_cells_[n]);
                for (size_t d = 0; d < D; ++d)
                    o[(h * N + n) * D + d] = (keys || !view_.v_trans) ? all[c * H * D + h * D + d]
                                                                      : all[(h * D + d) * cc + c];
            }
        return out;
    }

    llama_context *ctx_;
    int n_prefix_, n_head_, dk_, dv_;
    bool mrope_;
    int max_cells_;
    Rope rope_;
    int table_n_ = 1, half_ = 1;
    std::vector<float> cos_, sin_;
    std::vector<uint8_t> a_, b_;
    size_t size_a_ = 0;
    StateView view_;
    std::vector<int32_t> prefix_cells_, slot_cells_;
    std::vector<size_t> k_at_, v_at_;
    std::vector<Scratch> scratch_;
};

PYBIND11_MODULE(_native, m) {
    m.doc() = "edge-runtime's KV compression pass over llama.cpp's sequence state (InfiniPot-V).";
    py::class_<KVPass>(m, "KVPass")
        .def(py::init<uintptr_t, int, int, int, int, bool, int, int, double, double, int, int, int>(), py::arg("ctx"),
             py::arg("n_prefix"), py::arg("n_head_kv"), py::arg("head_dim_k"), py::arg("head_dim_v"),
             py::arg("mrope"), py::arg("rope_type"), py::arg("n_rot"), py::arg("freq_base"), py::arg("freq_scale"),
             py::arg("max_cells"), py::arg("max_position"), py::arg("n_threads") = 1)
        .def("read", &KVPass::read, py::call_guard<py::gil_scoped_release>())
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
        .def("apply_truncated_for_test", &KVPass::apply_truncated_for_test);
}
