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
#include <vector>

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

class KVPass {
  public:
    KVPass(uintptr_t ctx, int n_prefix, int n_head_kv, int head_dim_k, int head_dim_v, bool mrope, int rope_type,
           int n_rot, double freq_base, double freq_scale, int max_cells, int max_position)
        : ctx_(reinterpret_cast<llama_context *>(ctx)), n_prefix_(n_prefix), n_head_(n_head_kv), dk_(head_dim_k),
          dv_(head_dim_v), mrope_(mrope), max_cells_(max_cells) {
        rope_.type = rope_type;
        rope_.n_rot = n_rot;
        rope_.freq_base = freq_base;
        rope_.freq_scale = freq_scale;
        // cos/sin of every position a reindexed cache can hold, for un-rotating and re-rotating keys;
        // positions past the table (keep mode on long streams) are computed directly.
        table_n_ = std::max(max_position, 1);
        int half = std::max(n_rot / 2, 1);
        cos_.resize(size_t(table_n_) * half);
        sin_.resize(size_t(table_n_) * half);
        for (int p = 0; p < table_n_; ++p)
            for (int i = 0; i < half; ++i) {
                double th = angle(p, i);
                cos_[size_t(p) * half + i] = std::cos(th);
                sin_[size_t(p) * half + i] = std::sin(th);
            }
    }

    // Copy the sequence's state into buffer A and parse it; sizes both buffers on the first call.
    void read() {
        size_t size = llama_state_seq_get_size(ctx_, 0);
        if (a_.empty()) {
            a_.resize(size);
            size_t got = llama_state_seq_get_data(ctx_, a_.data(), size, 0);
            view_ = edge::parse_state(a_.data(), got, mrope_);
            check_layout();
            size_t cap = edge::state_size_for(view_, size_t(max_cells_));
            cap = std::max(cap, size);
            a_.resize(cap);
            b_.resize(cap);
            size_a_ = got;
        } else {
            if (size > a_.size())
                throw std::runtime_error("KV state of " + std::to_string(size) + " bytes exceeds the pass buffer of " +
                                         std::to_string(a_.size()) + " (more cells than the budget?)");
            size_a_ = llama_state_seq_get_data(ctx_, a_.data(), a_.size(), 0);
            view_ = edge::parse_state(a_.data(), size_a_, mrope_);
        }
        // Cells below n_prefix are the system prompt: never touched. The rest, by position, are the slots.
        prefix_cells_.clear();
        slot_cells_.clear();
        for (uint32_t c = 0; c < view_.cell_count; ++c)
            (view_.pos[c] < n_prefix_ ? prefix_cells_ : slot_cells_).push_back(int32_t(c));
        std::sort(slot_cells_.begin(), slot_cells_.end(),
                  [&](int32_t a, int32_t b) { return view_.pos[a] < view_.pos[b]; });
        std::sort(prefix_cells_.begin(), prefix_cells_.end(),
                  [&](int32_t a, int32_t b) { return view_.pos[a] < view_.pos[b]; });
        ensure_scratch(slot_cells_.size());
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
    py::array_t<float> keys(int layer) const { return rows(layer, true); }
    py::array_t<float> values(int layer) const { return rows(layer, false); }

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
        const int32_t *F = slot_frame.data(), *P = slot_patch.data(), *R = rot_pos.data();
        I32Array out({py::ssize_t(L), py::ssize_t(H), py::ssize_t(keep)});
        int32_t *o = out.mutable_data();
        ensure_grid(p);
        for (size_t l = 0; l < L; ++l) {
            int kernel = pool ? pool_kernel(l, L) : 1;
            for (size_t h = 0; h < H; ++h) {
                const size_t base = (l * H + h) * N;
                select_head(l, h, F + base, P + base, R + base, nx, p, recent_min_frame, size_t(keep), alpha, kernel,
                            use_tar, use_van, o + (l * H + h) * size_t(keep));
            }
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
            size_t start = w;
            put(a + view_.cell_offset[slot_cells_[K[j]]], rec);  // head (0, 0)'s token: its seq ids
            std::memcpy(b + start, &NPOS[j], 4);
        }
        put32(view_.v_trans);
        put32(view_.n_layer);
        std::vector<float> &tmp = rowf_;
        for (size_t l = 0; l < L; ++l) {
            const auto &LV = view_.layers[l];
            put(&LV.k_type, 4);
            put(&LV.k_row_bytes, 8);
            const size_t row = LV.k_row_bytes, hb = row / H;
            for (size_t i = 0; i < NP; ++i) put(a + LV.k_offset + size_t(prefix_cells_[i]) * row, row);
            for (size_t j = 0; j < C; ++j) {
                for (size_t h = 0; h < H; ++h) {
                    const int32_t slot = K[(l * H + h) * C + j];
                    const uint8_t *src = a + LV.k_offset + size_t(slot_cells_[slot]) * row + h * hb;
                    uint8_t *dst = b + w + h * hb;
                    int delta = NPOS[j] - RP[(l * H + h) * N + slot];
                    if (rerotate && delta != 0) {
                        to_float(LV.k_type, src, tmp.data(), size_t(dk_));
                        rotate(tmp.data(), delta);
                        from_float(LV.k_type, tmp.data(), dst, size_t(dk_));
                    } else {
                        std::memcpy(dst, src, hb);
                    }
                }
                w += row;
            }
        }
        for (size_t l = 0; l < L; ++l) {
            const auto &LV = view_.layers[l];
            put(&LV.v_type, 4);
            if (!view_.v_trans) {
                put(&LV.v_row_bytes, 8);
                const size_t row = LV.v_row_bytes, hb = row / H;
                for (size_t i = 0; i < NP; ++i) put(a + LV.v_offset + size_t(prefix_cells_[i]) * row, row);
                for (size_t j = 0; j < C; ++j) {
                    for (size_t h = 0; h < H; ++h) {
                        const int32_t slot = K[(l * H + h) * C + j];
                        std::memcpy(b + w + h * hb, a + LV.v_offset + size_t(slot_cells_[slot]) * row + h * hb, hb);
                    }
                    w += row;
                }
            } else {
                put(&LV.v_elem_bytes, 4);
                put(&LV.n_embd_v, 4);
                const size_t eb = LV.v_elem_bytes, cc = view_.cell_count, dv = LV.n_embd_v / H;
                for (size_t d = 0; d < LV.n_embd_v; ++d) {
                    const uint8_t *run = a + LV.v_offset + d * cc * eb;
                    for (size_t i = 0; i < NP; ++i) put(run + size_t(prefix_cells_[i]) * eb, eb);
                    const int32_t *kh = K + (l * H + d / dv) * C;
                    for (size_t j = 0; j < C; ++j) put(run + size_t(slot_cells_[kh[j]]) * eb, eb);
                }
            }
        }
        if (w != out_size) throw std::logic_error("compressed state size mismatch");
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

    // Rotate x (head_dim floats) by `delta` positions: x <- R(delta) x.
    void rotate(float *x, int delta) const {
        const int half = rope_.n_rot / 2;
        const bool neg = delta < 0;
        const int ad = neg ? -delta : delta;
        for (int i = 0; i < half; ++i) {
            double c, s;
            if (ad < table_n_) {
                c = cos_[size_t(ad) * half + i];
                s = sin_[size_t(ad) * half + i];
            } else {
                double th = angle(ad, i);
                c = std::cos(th);
                s = std::sin(th);
            }
            if (neg) s = -s;
            const int i0 = rope_.type == LLAMA_ROPE_TYPE_NEOX ? i : 2 * i;
            const int i1 = rope_.type == LLAMA_ROPE_TYPE_NEOX ? i + half : 2 * i + 1;
            const double a = x[i0], b = x[i1];
            x[i0] = float(a * c - b * s);
            x[i1] = float(a * s + b * c);
        }
    }

    static void to_float(int type, const uint8_t *src, float *dst, size_t n) {
        if (type == GGML_TYPE_F16)
            ggml_fp16_to_fp32_row(reinterpret_cast<const ggml_fp16_t *>(src), dst, int64_t(n));
        else if (type == GGML_TYPE_F32)
            std::memcpy(dst, src, n * 4);
        else
            throw std::runtime_error("unsupported KV type");
    }

    static void from_float(int type, const float *src, uint8_t *dst, size_t n) {
        if (type == GGML_TYPE_F16)
            ggml_fp32_to_fp16_row(src, reinterpret_cast<ggml_fp16_t *>(dst), int64_t(n));
        else
            std::memcpy(dst, src, n * 4);
    }

    void check_layout() const {
        for (const auto &L : view_.layers) {
            for (int t : {L.k_type, L.v_type})
                if (t != GGML_TYPE_F16 && t != GGML_TYPE_F32)
                    throw std::runtime_error(std::string("the KV cache is ") + ggml_type_name(ggml_type(t)) +
                                             "; compression supports f16 and f32 caches (drop --cache-type)");
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

    void ensure_scratch(size_t n) {
        if (unit_.size() < n * dk_) unit_.resize(std::max(n, size_t(max_cells_)) * dk_);
        if (tar_.size() < n) {
            size_t m = std::max(n, size_t(max_cells_));
            tar_.resize(m);
            van_.resize(m);
            pooled_.resize(m);
            idx_.resize(m);
            mark_.resize(m);
        }
        if (rowf_.size() < size_t(std::max(dk_, dv_))) rowf_.resize(size_t(std::max(dk_, dv_)));
    }

    void ensure_grid(size_t p) {
        if (sum_.size() < p * dk_) sum_.resize(p * dk_);
        if (recent_slot_.size() < p) recent_slot_.resize(p);
        if (grid_.size() < p) {
            grid_.resize(p);
            present_.resize(p);
        }
    }

    // The key of slot n, head h of layer l, un-rotated to position 0 and scaled to unit length (into out).
    void unit_key(size_t l, size_t h, size_t n, int pos, double *out) {
        const auto &LV = view_.layers[l];
        const uint8_t *src = a_.data() + LV.k_offset + size_t(slot_cells_[n]) * LV.k_row_bytes +
                             h * (LV.k_row_bytes / size_t(n_head_));
        to_float(LV.k_type, src, rowf_.data(), size_t(dk_));
        if (rope_.n_rot > 0 && pos != 0) rotate(rowf_.data(), -pos);
        double norm = 0;
        for (int d = 0; d < dk_; ++d) norm += double(rowf_[d]) * rowf_[d];
        norm = std::sqrt(norm);
        const double inv = norm > 1e-12 ? 1.0 / norm : 0.0;  // cos = a.b / max(|a||b|, eps)
        for (int d = 0; d < dk_; ++d) out[d] = rowf_[d] * inv;
    }

    double value_norm(size_t l, size_t h, size_t n) {
        const auto &LV = view_.layers[l];
        const size_t c = size_t(slot_cells_[n]);
        double s = 0;
        if (!view_.v_trans) {
            const uint8_t *src = a_.data() + LV.v_offset + c * LV.v_row_bytes + h * (LV.v_row_bytes / size_t(n_head_));
            to_float(LV.v_type, src, rowf_.data(), size_t(dv_));
            for (int d = 0; d < dv_; ++d) s += double(rowf_[d]) * rowf_[d];
        } else {
            const size_t eb = LV.v_elem_bytes, cc = view_.cell_count, dv = LV.n_embd_v / size_t(n_head_);
            for (size_t d = h * dv; d < (h + 1) * dv; ++d) {
                float v;
                to_float(LV.v_type, a_.data() + LV.v_offset + (d * cc + c) * eb, &v, 1);
                s += double(v) * v;
            }
        }
        return std::sqrt(s);
    }

    void select_head(size_t l, size_t h, const int32_t *frame, const int32_t *patch, const int32_t *rpos, int nx,
                     size_t p, int recent_min_frame, size_t keep, double alpha, int kernel, bool use_tar,
                     bool use_van, int32_t *out) {
        const size_t N = slot_cells_.size();
        // The recent frames: every patch of each must be here, once.
        std::fill(recent_slot_.begin(), recent_slot_.begin() + long(p), -1);
        size_t n_recent_tokens = 0;
        int n_recent_frames = 0, last_frame = INT32_MIN;
        for (size_t n = 0; n < N; ++n) {
            if (n > 0 && frame[n] < frame[n - 1]) throw std::logic_error("slots are not in time order");
            mark_[n] = 0;
            if (frame[n] < recent_min_frame) continue;
            if (patch[n] < 0 || size_t(patch[n]) >= p) throw std::invalid_argument("patch index outside the grid");
            if (frame[n] != last_frame) {
                last_frame = frame[n];
                ++n_recent_frames;
            }
            mark_[n] = 1;
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
            std::fill(sum_.begin(), sum_.begin() + long(p * dk_), 0.0);
            for (size_t n = 0; n < N; ++n) {
                double *u = unit_.data() + n * dk_;
                unit_key(l, h, n, rpos[n], u);
                if (mark_[n]) {
                    double *s = sum_.data() + size_t(patch[n]) * dk_;
                    for (int d = 0; d < dk_; ++d) s[d] += u[d];
                }
            }
            for (size_t n = 0; n < N; ++n) {
                if (mark_[n]) continue;
                if (patch[n] < 0 || size_t(patch[n]) >= p) throw std::invalid_argument("patch index outside the grid");
                const double *u = unit_.data() + n * dk_, *s = sum_.data() + size_t(patch[n]) * dk_;
                double dot = 0;
                for (int d = 0; d < dk_; ++d) dot += u[d] * s[d];
                tar_[n] = -dot / double(r);
            }
        }
        if (use_van) {
            for (size_t n = 0; n < N; ++n) van_[n] = value_norm(l, h, n);
            if (kernel > 1) pool_van(frame, patch, nx, p, kernel);
        }

        // Candidates: the past (non-recent) slots.
        size_t nc = 0;
        for (size_t n = 0; n < N; ++n)
            if (!mark_[n]) idx_[nc++] = int32_t(n);
        size_t n_kept_past = keep - rp;
        if (use_tar && use_van) {
            long n_tar = long(std::floor(alpha * double(keep))) - long(rp);
            if (n_tar < 0) throw std::invalid_argument("alpha * |C| must cover the recent frames");
            size_t nt = std::min(size_t(n_tar), nc);
            top_k(idx_.data(), nc, nt, tar_.data());
            for (size_t i = 0; i < nt; ++i) mark_[size_t(idx_[i])] = 1;  // protected by TaR
            // The rest of the room goes to the highest VaN among the unprotected.
            std::copy(idx_.begin() + long(nt), idx_.begin() + long(nc), idx_.begin());
            nc -= nt;
            n_kept_past -= nt;
            top_k(idx_.data(), nc, n_kept_past, van_.data());
        } else {
            top_k(idx_.data(), nc, n_kept_past, use_tar ? tar_.data() : van_.data());
        }
        for (size_t i = 0; i < std::min(n_kept_past, nc); ++i) mark_[size_t(idx_[i])] = 1;
        size_t k = 0;
        for (size_t n = 0; n < N; ++n)
            if (mark_[n]) out[k++] = int32_t(n);
        if (k != keep) throw std::logic_error("selection kept " + std::to_string(k) + " slots, not " + std::to_string(keep));
    }

    // Mean of VaN over the k x k window of the same frame, over the slots this head still holds.
    void pool_van(const int32_t *frame, const int32_t *patch, int nx, size_t p, int kernel) {
        const size_t N = slot_cells_.size();
        const int half = kernel / 2, ny = int(p) / nx;
        size_t start = 0;
        while (start < N) {
            size_t end = start;
            while (end < N && frame[end] == frame[start]) ++end;
            for (size_t n = start; n < end; ++n) {
                grid_[size_t(patch[n])] = van_[n];
                present_[size_t(patch[n])] = 1;
            }
            for (size_t n = start; n < end; ++n) {
                const int x = patch[n] % nx, y = patch[n] / nx;
                double s = 0;
                int cnt = 0;
                for (int yy = std::max(0, y - half); yy <= std::min(ny - 1, y + half); ++yy)
                    for (int xx = std::max(0, x - half); xx <= std::min(nx - 1, x + half); ++xx)
                        if (present_[size_t(yy * nx + xx)]) {
                            s += grid_[size_t(yy * nx + xx)];
                            ++cnt;
                        }
                pooled_[n] = s / cnt;
            }
            for (size_t n = start; n < end; ++n) present_[size_t(patch[n])] = 0;
            start = end;
        }
        for (size_t n = 0; n < N; ++n) van_[n] = pooled_[n];
    }

    py::array_t<float> rows(int layer, bool keys) const {
        if (layer < 0 || size_t(layer) >= view_.n_layer) throw std::out_of_range("layer");
        const auto &LV = view_.layers[size_t(layer)];
        const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(keys ? dk_ : dv_);
        py::array_t<float> out({py::ssize_t(H), py::ssize_t(N), py::ssize_t(D)});
        float *o = out.mutable_data();
        for (size_t h = 0; h < H; ++h)
            for (size_t n = 0; n < N; ++n) {
                const size_t c = size_t(slot_cells_[n]);
                float *dst = o + (h * N + n) * D;
                if (keys || !view_.v_trans) {
                    const size_t row = keys ? LV.k_row_bytes : LV.v_row_bytes;
                    const size_t off = keys ? LV.k_offset : LV.v_offset;
                    to_float(keys ? LV.k_type : LV.v_type, a_.data() + off + c * row + h * (row / H), dst, D);
                } else {
                    const size_t eb = LV.v_elem_bytes, cc = view_.cell_count;
                    for (size_t d = 0; d < D; ++d)
                        to_float(LV.v_type, a_.data() + LV.v_offset + ((h * D + d) * cc + c) * eb, dst + d, 1);
                }
            }
        return out;
    }

    llama_context *ctx_;
    int n_prefix_, n_head_, dk_, dv_;
    bool mrope_;
    int max_cells_;
    Rope rope_;
    int table_n_ = 1;
    std::vector<double> cos_, sin_;
    std::vector<uint8_t> a_, b_;
    size_t size_a_ = 0;
    StateView view_;
    std::vector<int32_t> prefix_cells_, slot_cells_, idx_, recent_slot_;
    std::vector<uint8_t> mark_, present_;
    std::vector<double> unit_, sum_, tar_, van_, grid_, pooled_;
    std::vector<float> rowf_;
};

PYBIND11_MODULE(_native, m) {
    m.doc() = "edge-runtime's KV compression pass over llama.cpp's sequence state (InfiniPot-V).";
    py::class_<KVPass>(m, "KVPass")
        .def(py::init<uintptr_t, int, int, int, int, bool, int, int, double, double, int, int>(), py::arg("ctx"),
             py::arg("n_prefix"), py::arg("n_head_kv"), py::arg("head_dim_k"), py::arg("head_dim_v"),
             py::arg("mrope"), py::arg("rope_type"), py::arg("n_rot"), py::arg("freq_base"), py::arg("freq_scale"),
             py::arg("max_cells"), py::arg("max_position"))
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
