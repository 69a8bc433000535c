// The compression pass over llama.cpp's KV cache, in place, for one sequence. Two ways to reach the cache:
//
// Direct (in place; reindex mode): an evaluation callback (cb_eval, public API) records llama.cpp's own K
// and V tensors ("cache_k_l<il>", "cache_v_l<il>") during a decode. The pass scores straight from them, then
// moves the j-th kept token of each head into cell P + j (P = prefix cells), re-rotating its key to position
// P + j, and frees the cells after P + C with llama_memory_seq_rm. No cell metadata changes: in reindex mode
// cell c of the sequence holds position c (see read_direct), and the compacted cache keeps exactly that. The
// state is never copied. Where the tensors live decides who does the O(KV bytes) work:
//   - a CPU cache: this file's vector kernels (simd.hpp), reading and writing the tensors' host memory;
//   - a cache on another backend (CUDA, Vulkan, Metal): ggml graphs computed by that backend (graph_pass.cpp),
//     of which only the scores come back; the selection below is the same code either way.
//
// Portable (any backend, keep mode, M-RoPE, sliding-window and hybrid memories): copy the sequence's state
// out (llama_state_seq_get_data) into buffer A, score and select, gather the kept rows of every head into
// buffer B with rewritten cell records (keys re-rotated in reindex mode), carry the parts after the first
// KV cache (a sliding-window cache, a recurrent state), and hand B back (llama_state_seq_set_data).
// llama.cpp wipes the sequence when set_data fails; A is untouched then and goes back instead.
//
// Both paths run the same scoring, selection and re-rotation code on the same bytes, so they leave
// byte-identical caches (tests/test_direct_pass.py). All buffers are sized once; a pass allocates nothing.
//
// Method: InfiniPot-V, https://arxiv.org/abs/2506.15745 (TaR on keys, VaN on values, per layer and head).

#include "kv_pass.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <numeric>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "select.hpp"

namespace edge {

namespace {

// Rows a sweep will read kAhead rows from now: asked for early, so the loads of a row do not wait on
// memory while the scores of the previous ones are still being computed.
constexpr size_t kAhead = 8;

inline void prefetch_row(const uint8_t *p, size_t n) {
#if defined(__GNUC__)
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i);
#else
    (void)p, (void)n;
#endif
}

// The bookkeeping of slot n + kBook of every head (H rows of a table, M apart), asked for early: the tables
// were last touched before the pass streamed the whole cache through the CPU's caches, so they come from
// memory, and a sweep reads H entries 4 bytes wide (H streams a hardware prefetcher may not follow).
constexpr size_t kBook = 64;

inline void prefetch_book(const int32_t *t, size_t H, size_t M, size_t n, size_t N) {
    if (n + kBook < N)
        for (size_t h = 0; h < H; ++h) prefetch_row(reinterpret_cast<const uint8_t *>(t + h * M + n + kBook), 1);
}

// A head's bytes from one cell to another (never overlapping): short copies the compiler keeps inline.
inline void copy_bytes(uint8_t *__restrict dst, const uint8_t *__restrict src, size_t n) {
    size_t i = 0;
    for (; i + 32 <= n; i += 32) std::memcpy(dst + i, src + i, 32);
    for (; i + 8 <= n; i += 8) std::memcpy(dst + i, src + i, 8);
    for (; i < n; ++i) dst[i] = src[i];
}

// A row the CPU is about to write, asked for with intent to write: the stores then do not wait for it.
inline void prefetch_row_for_write(uint8_t *p, size_t n) {
#if defined(__GNUC__)
    for (size_t i = 0; i < n; i += 64) __builtin_prefetch(p + i, 1);
#else
    (void)p, (void)n;
#endif
}

// Run f(layer, scratch) for every layer on `n` threads (layers split round-robin); rethrow the first error.
// backwards: last layer first. The write-back runs backwards after a selection that ran forwards, so
// its first layers are the ones the selection left in the cache.
template <typename F> void for_layers(size_t n_layer, std::vector<Scratch> &scratch, F &&f, bool backwards = false) {
    const size_t n = std::min(scratch.size(), n_layer);
    auto layer = [&](size_t i) { return backwards ? n_layer - 1 - i : i; };
    if (n <= 1) {
        for (size_t i = 0; i < n_layer; ++i) f(layer(i), scratch[0]);
        return;
    }
    std::vector<std::exception_ptr> errors(n);
    std::vector<std::thread> threads;
    for (size_t t = 0; t < n; ++t)
        threads.emplace_back([&, t] {
            try {
                for (size_t i = t; i < n_layer; i += n) f(layer(i), scratch[t]);
            } catch (...) {
                errors[t] = std::current_exception();
            }
        });
    for (auto &th : threads) th.join();
    for (auto &e : errors)
        if (e) std::rethrow_exception(e);
}

}  // namespace

KVPass::KVPass(uintptr_t ctx, const PassParams &p, KVCapture *capture)
    : ctx_(reinterpret_cast<llama_context *>(ctx)), seq_(p.seq_id), n_prefix_(p.n_prefix), n_head_(p.n_head_kv),
      dk_(p.head_dim_k), dv_(p.head_dim_v), mrope_(p.mrope), max_cells_(p.max_cells), in_place_(p.in_place),
      capture_(capture), graph_on_cpu_(p.graph_on_cpu), scratch_(size_t(std::max(p.n_threads, 1))) {
    const int rope_type = p.rope_type, n_rot = p.n_rot, head_dim_k = p.head_dim_k;
    layout_ = edge::layout_of(llama_get_model(ctx_), mrope_);
    rope_.type = rope_type;
    rope_.n_rot = n_rot;
    rope_.freq_base = p.freq_base;
    rope_.freq_scale = p.freq_scale;
    // RoPE tables (see RopeLayout) for every position a reindexed cache can hold, for un-rotating and
    // re-rotating keys; positions past the table (keep mode on long streams) are computed directly.
    // M-RoPE pairs its dims as NeoX does (ggml-cpu/ops.cpp rotate_pairs, MROPE and IMROPE cases).
    rl_.neox = rope_type == LLAMA_ROPE_TYPE_NEOX || multi_rope();
    rl_.n_rot = std::max(std::min(n_rot, head_dim_k), 0);
    set_pair_turns(p.rope_sections);
    rl_.D = head_dim_k;
    rl_.vec = fits_width(rl_, 8);
    rl_.vec16 = fits_width(rl_, 16);
    table_n_ = std::max(p.max_position, 1);
    const size_t nr = size_t(rl_.n_rot);
    rc_.resize(size_t(table_n_) * nr);
    rs_.resize(size_t(table_n_) * nr);
    for (int q = 0; q < table_n_; ++q) fill_tables(q, &rc_[size_t(q) * nr], &rs_[size_t(q) * nr]);
    if (p.sliding_freq_base > 0) set_sliding_rope(p.sliding_freq_base, 1.0);
}

py::dict KVPass::compress(const I32Array &frame, const I32Array &patch, const I32Array &rot_pos, int n_video,
                          const py::object &choice, bool reindex, int next_pos, std::optional<I32Array> new_pos,
                          const py::object &on_read) {
    using clock = std::chrono::steady_clock;
    const auto ms = [](clock::time_point a, clock::time_point b) {
        return std::chrono::duration<double, std::milli>(b - a).count();
    };
    const auto t0 = clock::now();
    score_ms_ = 0;
    std::string fallback;
    bool direct = false;
    if (in_place_ && reindex && capture_) {
        if (!direct_checked_) {
            direct_why_ = direct_support(*capture_);
            direct_checked_ = true;
        }
        if (direct_why_.empty()) {
            py::gil_scoped_release nogil;
            fallback = read_direct(n_video);
            direct = fallback.empty();
        }
    }
    if (!direct) {
        try {
            py::gil_scoped_release nogil;
            read();
        } catch (const std::runtime_error &e) {  // a layout the pass cannot rewrite: nothing moved
            throw std::runtime_error(std::string("cannot compress this KV cache: ") + e.what());
        }
    }
    if (slot_cells_.size() != size_t(n_video))
        throw std::runtime_error("the KV cache holds " + std::to_string(slot_cells_.size()) + " video cells but " +
                                 std::to_string(n_video) + " were recorded: was the context used by another "
                                 "program?");
    if (!on_read.is_none()) on_read();
    const auto t1 = clock::now();
    I32Array kept;
    py::object per_head = py::none();  // shared: the per-head choices that voted (diagnostics)
    if (py::isinstance<ScoreParams>(choice)) {
        const ScoreParams sp = choice.cast<ScoreParams>();
        // A final native choice moves each layer while it is still in the CPU's cache.
        if (direct_ && !graph_ && !sp.shared) plan_ = true;
        kept = select(frame, patch, rot_pos, sp.nx, sp.ny, sp.recent_min_frame, sp.keep, sp.alpha, sp.pool,
                      sp.use_tar, sp.use_van);
        if (sp.shared) {
            per_head = kept;
            kept = shared_choice(kept, size_t(sp.keep));
        }
    } else {
        kept = choice.cast<I32Array>();
    }
    const auto t2 = clock::now();
    if (kept.ndim() != 3 || size_t(kept.shape(0)) != n_layer_ || size_t(kept.shape(1)) != size_t(n_head_))
        throw std::invalid_argument("kept must be [n_layer, n_head_kv, C]");
    const size_t C = size_t(kept.shape(2));
    I32Array pos(py::ssize_t(C), nullptr);
    if (new_pos) {
        pos = *new_pos;
    } else {
        int32_t *o = pos.mutable_data();
        const int32_t *K = kept.data();
        if (!reindex && mrope_) {
            check_bookkeeping(rot_pos, n_layer_, size_t(n_head_), slot_cells_.size());
            for (size_t j = 0; j < C; ++j) o[j] = rot_pos.data()[K[j]];  // head (0, 0)'s tokens, in time order
        } else {
            const int32_t first = reindex ? n_prefix_ : next_pos - int32_t(C);
            for (size_t j = 0; j < C; ++j) o[j] = first + int32_t(j);
        }
    }
    apply(kept, pos, rot_pos, reindex);
    const auto t3 = clock::now();
    py::dict out;
    out["kept"] = kept;
    out["new_pos"] = pos;
    out["path"] = path();
    out["backend"] = backend();
    out["fallback"] = fallback;  // why the in-place pass copied this time ("" when it did not have to)
    out["read_ms"] = ms(t0, t1);
    out["select_ms"] = ms(t1, t2);
    out["score_ms"] = score_ms_;  // the part of select_ms the graph route spends scoring on the device
    out["apply_ms"] = ms(t2, t3);
    out["state_bytes"] = state_bytes_;
    out["per_head"] = per_head;
    return out;
}

std::string KVPass::in_place_refusal() {
    if (!in_place_) return "the in-place pass is turned off";
    if (!capture_) return "no evaluation callback found llama.cpp's KV tensors";
    if (!direct_checked_) {
        direct_why_ = direct_support(*capture_);
        direct_checked_ = true;
    }
    return direct_why_;
}

void KVPass::set_sliding_rope(double freq_base, double freq_scale) {
    sliding_rope_ = rope_;
    sliding_rope_.freq_base = freq_base;
    sliding_rope_.freq_scale = freq_scale;
    sliding_rope_set_ = true;
}

void KVPass::read() {
    direct_ = plan_ = moved_ = false;
    size_t size = llama_state_seq_get_size(ctx_, seq_);
    if (a_.empty()) {
        a_.resize(size);
        size_a_ = llama_state_seq_get_data(ctx_, a_.data(), size, seq_);
        edge::parse_state(a_.data(), size_a_, layout_, view_);
        check_layout();
        size_t cap = std::max(edge::state_capacity_for(view_, size_t(max_cells_)), size);
        a_.resize(cap);
        b_.resize(cap);
    } else {
        if (size > a_.size())
            throw std::runtime_error("KV state of " + std::to_string(size) + " bytes exceeds the pass buffer of " +
                                     std::to_string(a_.size()) + " (more cells than the budget?)");
        size_a_ = llama_state_seq_get_data(ctx_, a_.data(), a_.size(), seq_);
        edge::parse_state(a_.data(), size_a_, layout_, view_);
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
    std::sort(prefix_cells_.begin(), prefix_cells_.end(), by_pos);
    if (!mrope_) {
        std::sort(slot_cells_.begin(), slot_cells_.end(), by_pos);
    } else {
        // All tokens of an M-RoPE frame share one position; within it mtmd gives token i x = pos + i % nx,
        // y = pos + i / nx (mtmd.cpp mtmd_image_tokens_get_decoder_pos), so (pos, y, x) is time order
        // whatever cells llama.cpp put them in. Rewritten slots keep it (apply_portable).
        auto by_pos_yx = [&](int32_t a, int32_t b) {
            const auto &v = view_;
            if (v.pos[a] != v.pos[b]) return v.pos[a] < v.pos[b];
            if (v.ext_y[a] != v.ext_y[b]) return v.ext_y[a] < v.ext_y[b];
            return v.ext_x[a] < v.ext_x[b];
        };
        std::sort(slot_cells_.begin(), slot_cells_.end(), by_pos_yx);
    }
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

I32Array KVPass::slot_ext() const {
    if (!mrope_ || direct_) throw std::logic_error("slot_ext needs an M-RoPE state read by read()");
    I32Array out({py::ssize_t(slot_cells_.size()), py::ssize_t(2)});
    auto o = out.mutable_unchecked<2>();
    for (size_t n = 0; n < slot_cells_.size(); ++n) {
        o(py::ssize_t(n), 0) = view_.ext_x[size_t(slot_cells_[n])];
        o(py::ssize_t(n), 1) = view_.ext_y[size_t(slot_cells_[n])];
    }
    return out;
}

std::string KVPass::direct_support(KVCapture &cap) {
    cap_ = nullptr;
    if (mrope_) return "M-RoPE models keep x/y positions per cell, which the in-place pass does not rewrite";
    if (layout_.n_caches > 1)
        return "sliding-window models keep a second KV cache (the sliding layers') whose cells hold other "
               "positions than the global one's";
    if (layout_.recurrent)
        return "hybrid models keep a recurrent state beside the KV cache, and llama.cpp cannot free the end of "
               "a recurrent sequence (seq_rm) as the in-place pass does";
    if (rope_.type != LLAMA_ROPE_TYPE_NORM && rope_.type != LLAMA_ROPE_TYPE_NEOX)
        return "re-rotation in place supports normal and NeoX RoPE only";
    if (cap.conflict()) return "more than one KV cache per layer (sliding-window or shared caches)";
    if (!cap.complete()) return "the evaluation callback has not seen every layer's K and V tensors";
    bool host = true;
    for (size_t l = 0; l < cap.n_layer(); ++l)
        for (ggml_tensor *t : {cap.k(l), cap.v(l)}) {
            if (!t->buffer || !t->data) return "a KV tensor has no data";
            host = host && ggml_backend_buffer_is_host(t->buffer);
            if (t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_F32)
                return std::string("the KV cache is ") + ggml_type_name(t->type);
            if (t->ne[2] != 1 || t->ne[3] != 1) return "the KV cache has more than one stream";
            if (t->nb[1] != ggml_row_size(t->type, t->ne[0])) return "the KV tensors are not contiguous";
            if (t->ne[1] < max_cells_) return "the KV cache has fewer cells than the budget";
        }
    for (size_t l = 0; l < cap.n_layer(); ++l)
        if (cap.k(l)->ne[0] != int64_t(n_head_) * dk_ || cap.v(l)->ne[0] != int64_t(n_head_) * dv_)
            return "K or V rows do not match n_head_kv x head_dim";
    graph_.reset();
    if (!host || graph_on_cpu_) {
        // Not the CPU's memory (a GPU): the O(KV bytes) work runs as ggml graphs on the cache's own backend.
        GraphGeometry g;
        g.n_head = n_head_, g.dk = dk_, g.dv = dv_;
        g.n_rot = rl_.n_rot, g.rope_mode = rope_.type;
        g.freq_base = float(rope_.freq_base), g.freq_scale = float(rope_.freq_scale);
        g.n_ctx_orig = table_n_;
        g.n_threads = int(scratch_.size());
        std::string why;
        graph_ = GraphPass::make(cap, g, why);
        if (graph_) why = graph_->probe(8);
        if (!why.empty()) {
            graph_.reset();
            return "the KV cache is not in host memory and the in-place graphs cannot run there: " + why;
        }
    }
    cap_ = &cap;
    verified_ = false;
    return "";
}

std::string KVPass::read_direct(int n_video) {
    direct_ = plan_ = moved_ = false;
    if (!cap_) throw std::logic_error("read_direct before a successful direct_support");
    // A GPU's decode may still be running when llama_decode returns: the cache is read once it is done.
    if (graph_) llama_synchronize(ctx_);
    const int total = n_prefix_ + n_video;
    llama_memory_t mem = llama_get_memory(ctx_);
    const llama_pos lo = llama_memory_seq_pos_min(mem, seq_), hi = llama_memory_seq_pos_max(mem, seq_);
    if (lo != 0 || hi != total - 1) {
        verified_ = false;
        return "the sequence spans positions [" + std::to_string(lo) + ", " + std::to_string(hi) + "], not [0, " +
               std::to_string(total - 1) + "]";
    }
    if (total > max_cells_) return "the sequence holds more cells than the budget the pass was sized for";
    if (verified_) {
        // get_size walks the cell metadata only: it counts the cells without copying K or V.
        const size_t size = llama_state_seq_get_size(ctx_, seq_), want = edge::state_size_for(dview_, size_t(total));
        if (size != want) {
            verified_ = false;
            return "the KV state is " + std::to_string(size) + " bytes, not the " + std::to_string(want) +
                   " of " + std::to_string(total) + " cells";
        }
        state_bytes_ = size;
        // The cells the last direct pass left must still hold what it left there: a re-packed or
        // permuted sequence (set_data of another layout) moves them, and then the layout is checked
        // in full again.
        if (!fingerprint_matches()) {
            verified_ = false;
            std::string why = verify_layout(total);
            if (!why.empty()) return why;
            verified_ = true;
        }
    } else {
        std::string why = verify_layout(total);
        if (!why.empty()) return why;
        verified_ = true;
    }
    n_layer_ = cap_->n_layer();
    v_trans_ = dview_.v_trans != 0;
    if (graph_) graph_->set_v_trans(v_trans_);
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

void KVPass::plan_in_place() {
    if (!direct_) throw std::logic_error("plan_in_place needs a direct read");
    plan_ = true;
}

I32Array KVPass::slot_positions() const {
    I32Array out(py::ssize_t(slot_cells_.size()));
    auto o = out.mutable_unchecked<1>();
    for (size_t n = 0; n < slot_cells_.size(); ++n)
        o(py::ssize_t(n)) = direct_ ? slot_cells_[n] : view_.pos[slot_cells_[n]];  // direct: cell = position
    return out;
}

py::tuple KVPass::scores() const {
    if (rec_tar_.empty()) throw std::logic_error("no scores recorded: call record_scores(True) before select()");
    const std::vector<py::ssize_t> shape{py::ssize_t(n_layer_), py::ssize_t(n_head_), py::ssize_t(rec_n_)};
    return py::make_tuple(py::array_t<double>(shape, rec_tar_.data()), py::array_t<double>(shape, rec_van_.data()));
}

I32Array KVPass::select(const I32Array &slot_frame, const I32Array &slot_patch, const I32Array &rot_pos, int nx, int ny,
                        int recent_min_frame, int keep, double alpha, bool pool, bool use_tar, bool use_van) {
    const size_t L = n_layer_, H = size_t(n_head_), N = slot_cells_.size(), p = size_t(nx) * ny;
    const size_t M = check_bookkeeping(slot_frame, L, H, N);
    if (check_bookkeeping(slot_patch, L, H, N) != M || check_bookkeeping(rot_pos, L, H, N) != M)
        throw std::invalid_argument("the bookkeeping arrays differ in shape");
    if (keep <= 0 || size_t(keep) > N) throw std::invalid_argument("keep must be in [1, slots]");
    if (nx <= 0 || ny <= 0) throw std::invalid_argument("empty patch grid");
    const int32_t *F = slot_frame.data(), *P = slot_patch.data(), *R = rot_pos.data();
    I32Array out({py::ssize_t(L), py::ssize_t(H), py::ssize_t(keep)});
    int32_t *o = out.mutable_data();
    for (auto &S : scratch_) {
        if (S.sum.size() < H * p * dk_) S.sum.resize(H * p * dk_);
        if (S.grid.size() < p) S.grid.resize(p), S.present.resize(p);
    }
    const bool move = direct_ && plan_;
    plan_ = false;
    marks_.resize(L * H * N);
    recent_.resize(L * H);
    if (record_) rec_tar_.assign(L * H * N, 0.0), rec_van_.assign(L * H * N, 0.0), rec_n_ = N;
    {
        py::gil_scoped_release nogil;
        // Every input of every layer is checked (and the recent frames marked) before any layer is
        // scored: with `move`, each layer moves right after its selection, while its K and V are still
        // in the CPU's cache, and nothing may fail once a byte moved.
        for_layers(L, scratch_, [&](size_t l, Scratch &) {
            for (size_t h = 0; h < H; ++h) {
                const size_t at = (l * H + h) * M;
                const size_t r = mark_recent(marks_.data() + (l * H + h) * N, F + at, P + at, p, recent_min_frame, l, h);
                recent_[l * H + h] = r;
                if (size_t(keep) < r * p) throw std::invalid_argument("|C| is smaller than the recent frames");
                if (use_tar && use_van && long(std::floor(alpha * double(keep))) < long(r * p))
                    throw std::invalid_argument("alpha * |C| must cover the recent frames");
            }
        });
        if (graph_ && direct_) {
            // The scores are computed where the cache lives; only they come back, layer by layer.
            ScoreInputs in;
            in.P = size_t(n_prefix_), in.N = N, in.M = M, in.p = p;
            in.frame = F, in.patch = P, in.rot_pos = R, in.marks = marks_.data(), in.recent = recent_.data();
            const auto t = std::chrono::steady_clock::now();
            graph_->score(in);  // synchronous: ggml_backend_graph_compute waits for the backend
            score_ms_ = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
        }
        for_layers(L, scratch_, [&](size_t l, Scratch &S) {
            int32_t *kept = o + l * H * size_t(keep);
            select_layer(S, l, F + l * H * M, P + l * H * M, R + l * H * M, M, nx, p, size_t(keep), alpha,
                         pool ? pool_kernel(l, L) : 1, use_tar, use_van, kept);
            if (move) move_layer(l, S, kept, size_t(keep), R + l * H * M, M);
        });
    }
    if (move) {
        moved_ = true;
        moved_keep_ = size_t(keep);
        moved_kept_.assign(o, o + L * H * size_t(keep));
    }
    return out;
}

void KVPass::apply(const I32Array &kept, const I32Array &new_pos, const I32Array &rot_pos, bool rerotate) {
    const size_t L = n_layer_, H = size_t(n_head_), N = slot_cells_.size();
    if (kept.ndim() != 3 || size_t(kept.shape(0)) != L || size_t(kept.shape(1)) != H)
        throw std::invalid_argument("kept must be [n_layer, n_head_kv, C]");
    const size_t C = size_t(kept.shape(2));
    if (new_pos.ndim() != 1 || size_t(new_pos.shape(0)) != C) throw std::invalid_argument("new_pos must be [C]");
    const size_t M = check_bookkeeping(rot_pos, L, H, N);
    const int32_t *K = kept.data(), *NPOS = new_pos.data(), *RP = rot_pos.data();
    // select() already moved every layer (plan_in_place) by a selection it made itself, in range and
    // ascending: the same bytes need no second look.
    const bool as_moved =
        direct_ && moved_ && C == moved_keep_ && std::memcmp(K, moved_kept_.data(), L * H * C * 4) == 0;
    if (!as_moved)
        for (size_t i = 0; i < L * H * C; ++i)
            if (K[i] < 0 || size_t(K[i]) >= N) throw std::invalid_argument("kept holds a slot out of range");
    if (rerotate && rope_.type != LLAMA_ROPE_TYPE_NORM && rope_.type != LLAMA_ROPE_TYPE_NEOX &&
        !(multi_rope() && sections_known_))
        throw std::runtime_error("re-rotation supports normal, NeoX and (with its sections) M-RoPE only");
    if (direct_) {
        // In place, kept[j] >= j makes every move a forward copy (the source is never overwritten
        // first); that needs each head's list strictly ascending. Cell P + j keeps position P + j.
        if (!rerotate) throw std::invalid_argument("the direct path runs in reindex mode only");
        if (!as_moved)
            for (size_t lh = 0; lh < L * H; ++lh)
                for (size_t j = 1; j < C; ++j)
                    if (K[lh * C + j] <= K[lh * C + j - 1])
                        throw std::invalid_argument("kept slots must be strictly ascending per head");
        for (size_t j = 0; j < C; ++j)
            if (NPOS[j] != n_prefix_ + int32_t(j))
                throw std::invalid_argument("the direct path gives slot j position n_prefix + j");
        if (moved_) {
            // The cells hold select()'s choice already: this must be that very selection.
            moved_ = false;
            if (!as_moved)
                throw std::runtime_error("the selection applied in place differs from the one written back: "
                                         "the memory no longer matches its bookkeeping");
            finish_direct(C);
            return;
        }
        py::gil_scoped_release nogil;
        if (graph_) {
            graph_->move(size_t(n_prefix_), N, C, K, RP, M);
            finish_direct(C);
        } else {
            apply_direct(K, C, RP, M);
        }
        return;
    }
    apply_portable(K, C, NPOS, RP, M, rerotate);
}

// InfiniPot-V "shared": the per-head choices vote; the `keep` slots chosen most often (ties to the older
// slot) become every (layer, head)'s set, ascending. Every pass being shared, slot n holds the same token
// in every head, so the votes count one token each. The recent frames are in every choice.
I32Array KVPass::shared_choice(const I32Array &per_head, size_t keep) const {
    const size_t N = slot_cells_.size(), LH = n_layer_ * size_t(n_head_);
    std::vector<int64_t> votes(N, 0);
    const int32_t *k = per_head.data();
    for (size_t i = 0; i < LH * keep; ++i) ++votes[size_t(k[i])];
    std::vector<int32_t> order(N);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return votes[a] > votes[b]; });
    order.resize(keep);
    std::sort(order.begin(), order.end());
    I32Array out({py::ssize_t(n_layer_), py::ssize_t(n_head_), py::ssize_t(keep)});
    int32_t *o = out.mutable_data();
    for (size_t lh = 0; lh < LH; ++lh) std::copy(order.begin(), order.end(), o + lh * keep);
    return out;
}

// M-RoPE: which rotary pairs turn with the position. ggml gives pair i the section of sector
// i % (s0 + s1 + s2 + s3): t, h (y), w (x) or e (ggml-cpu/ops.cpp ggml_mrope_cache_init; IMROPE
// interleaves t, h, w). mtmd puts the frame's start position in t, y and x alike and 0 in e, text
// tokens get 0 in e too (llama-graph.cpp llm_graph_input_pos::set_input). So moving a token by delta
// positions turns its t, h and w pairs by delta and leaves the e pairs alone: one NeoX rotation with
// the e pairs held still (their tables hold cos 1, sin 0).
void KVPass::set_pair_turns(const std::vector<int> &sections) {
    pair_turns_.assign(size_t(rl_.n_rot / 2), 1);
    sections_known_ = false;
    if (!multi_rope()) return;
    if (sections.size() != 4) return;  // unknown: no re-rotation, and apply() refuses to re-index
    const int s0 = sections[0], s1 = sections[1], s2 = sections[2], s3 = sections[3];
    const int sect_dims = s0 + s1 + s2 + s3;
    if (sect_dims <= 0) return;
    for (size_t i = 0; i < pair_turns_.size(); ++i) {
        const int sector = int(i) % sect_dims;
        bool e;
        if (rope_.type == LLAMA_ROPE_TYPE_IMROPE)
            e = !((sector % 3 == 0 && sector < 3 * s0) || (sector % 3 == 1 && sector < 3 * s1) ||
                  (sector % 3 == 2 && sector < 3 * s2));
        else
            e = sector >= s0 + s1 + s2;
        pair_turns_[i] = !e;
    }
    sections_known_ = true;
}

double KVPass::angle(const Rope &rope, double pos, int i) {
    return pos * rope.freq_scale * std::pow(rope.freq_base, -2.0 * i / rope.n_rot);
}

void KVPass::fill_tables(const Rope &rope, int pos, float *C, float *S) const {
    const int half = rl_.n_rot / 2;
    for (int d = 0; d < rl_.n_rot; ++d) {
        const int i = rl_.neox ? d % half : d / 2;
        const bool first = rl_.neox ? d < half : d % 2 == 0;
        const double th = pair_turns_[size_t(i)] ? angle(rope, pos, i) : 0.0;
        C[d] = float(std::cos(th));
        S[d] = float(first ? std::sin(th) : -std::sin(th));
    }
}

// The tables of |pos| positions: from the table, or computed into tmp (2 n_rot floats).
void KVPass::tables(int pos, const float *&C, const float *&S, float *tmp) const {
    const int ad = pos < 0 ? -pos : pos;
    if (ad < table_n_) {
        C = &rc_[size_t(ad) * size_t(rl_.n_rot)];
        S = &rs_[size_t(ad) * size_t(rl_.n_rot)];
        return;
    }
    fill_tables(ad, tmp, tmp + rl_.n_rot);
    C = tmp;
    S = tmp + rl_.n_rot;
}

void KVPass::prefetch_tables(int pos) const {
    const size_t ad = size_t(pos < 0 ? -pos : pos), nr = size_t(rl_.n_rot) * sizeof(float);
    if (ad >= size_t(table_n_)) return;
    prefetch_row(reinterpret_cast<const uint8_t *>(&rc_[ad * size_t(rl_.n_rot)]), nr);
    prefetch_row(reinterpret_cast<const uint8_t *>(&rs_[ad * size_t(rl_.n_rot)]), nr);
}

// One head's key (stored layout and type) turned by delta positions from src to dst (dst may be
// src). Both paths call this, so a re-rotated key has the same bits whichever path moved it (the
// build turns off floating-point contraction: no context-dependent fused multiply-adds either).
// tmp: 2 n_rot + 2 D floats.
template <typename E>
void KVPass::turn_key(const uint8_t *src, uint8_t *dst, int delta, float *tmp) const {
    const float *C, *S;
    tables(delta, C, S, tmp);
    move_key(reinterpret_cast<const E *>(src), reinterpret_cast<E *>(dst), C, S, delta > 0, rl_,
             tmp + 2 * rl_.n_rot);
}

void KVPass::turn_key(const uint8_t *src, uint8_t *dst, int type, int delta, float *tmp) const {
    if (type == GGML_TYPE_F16)
        turn_key<uint16_t>(src, dst, delta, tmp);
    else
        turn_key<float>(src, dst, delta, tmp);
}

void KVPass::size_scratch(bool v_trans) {
    const size_t cells = size_t(max_cells_), H = size_t(n_head_);
    const size_t hk = H * dk_, hv = H * dv_;
    for (auto &S : scratch_) {
        if (S.raw.size() >= std::max(hk, hv) && (!v_trans || S.vacc.size() >= H * cells)) continue;
        S.raw.resize(std::max(hk, hv));
        S.unit.resize(size_t(dk_) * 4 + size_t(rl_.n_rot) * 2);
        for (auto *v : {&S.tar, &S.van}) v->resize(H * cells);
        S.pooled.resize(cells);
        S.cand.resize(cells);
        S.radix.resize(cells);
        S.keys.resize(cells);
        S.slots.resize(cells);
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

// The direct path's check against the parsed state: the sequence is exactly cells [0, total) holding
// positions 0..total-1 in cell order (state_write walks cells in index order), and the blob's rows are
// the captured tensors' rows [0, total). A shifted or permuted layout differs in some row.
std::string KVPass::verify_layout(int total) {
    std::vector<uint8_t> blob(llama_state_seq_get_size(ctx_, seq_));
    blob.resize(llama_state_seq_get_data(ctx_, blob.data(), blob.size(), seq_));
    try {
        edge::parse_state(blob.data(), blob.size(), layout_, dview_);
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
    // A tensor's first bytes as the CPU can read them: in place, or (a GPU's) copied out one layer at a time.
    std::vector<uint8_t> layer;
    auto bytes = [&](const ggml_tensor *t, size_t n) -> const uint8_t * {
        if (ggml_backend_buffer_is_host(t->buffer)) return static_cast<const uint8_t *>(t->data);
        layer.resize(n);
        GraphPass::read_bytes(t, 0, n, layer.data());
        return layer.data();
    };
    for (size_t l = 0; l < dview_.n_layer; ++l) {
        const auto &LV = dview_.layers[l];
        ggml_tensor *k = cap_->k(l), *v = cap_->v(l);
        if (LV.k_type != k->type || LV.v_type != v->type || LV.k_row_bytes != k->nb[1])
            return "layer " + std::to_string(l) + ": the state's K/V types or rows differ from the tensors'";
        if (std::memcmp(blob.data() + LV.k_offset, bytes(k, cc * LV.k_row_bytes), cc * LV.k_row_bytes) != 0)
            return "layer " + std::to_string(l) + ": the state's keys are not the tensor's cells [0, " +
                   std::to_string(cc) + ")";
        const uint8_t *vd = bytes(v, dview_.v_trans ? size_t(LV.n_embd_v) * size_t(v->ne[1]) * LV.v_elem_bytes
                                                    : cc * LV.v_row_bytes);
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

void KVPass::check_layout() const {
    for (const auto &L : view_.layers) {
        for (int t : {L.k_type, L.v_type})
            if (t != GGML_TYPE_F16 && t != GGML_TYPE_F32)
                throw std::runtime_error(std::string("the KV cache is ") + ggml_type_name(ggml_type(t)) +
                                         "; compression supports f16 and f32 caches (use --cache-type f16)");
        if (L.k_row_bytes != size_t(n_head_) * dk_ * ggml_type_size(ggml_type(L.k_type)))
            throw std::runtime_error("K rows do not match n_head_kv x head_dim");
    }
}

// A bookkeeping table [L, H, M]: slot n of (l, h) at (l * H + h) * M + n, for n < N <= M. Returns M.
size_t KVPass::check_bookkeeping(const I32Array &x, size_t L, size_t H, size_t N) {
    if (x.ndim() != 3 || size_t(x.shape(0)) != L || size_t(x.shape(1)) != H || size_t(x.shape(2)) < N)
        throw std::invalid_argument("bookkeeping arrays must be [n_layer, n_head_kv, >= n_slots] = [" +
                                    std::to_string(L) + ", " + std::to_string(H) + ", " + std::to_string(N) + "]");
    return size_t(x.shape(2));
}

int KVPass::pool_kernel(size_t l, size_t L) {
    if (4 * l < L) return 7;
    if (2 * l < L) return 5;
    if (4 * l < 3 * L) return 3;
    return 1;
}

// One layer: scores for all heads (each K and V row read once for every head), then per head the
// InfiniPot-V choice. F, P, R: this layer's bookkeeping, head h's slots at h * M.
void KVPass::select_layer(Scratch &S, size_t l, const int32_t *F, const int32_t *P, const int32_t *R, size_t M, int nx,
                          size_t p, size_t keep, double alpha, int kernel, bool use_tar, bool use_van, int32_t *out) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size();
    const size_t *r = recent_.data() + l * H;
    std::memcpy(S.mark.data(), marks_.data() + l * H * N, H * N);  // select() marked the recent slots
    // V rows are read in the same sweep as the keys when they can be: two streams in flight at once.
    const bool van_rows = use_tar && use_van && !v_trans_;
    const bool graph = graph_ && direct_;
    if (graph) {  // scored by the graph route: TaR = -(unit key . its patch's recent sum), VaN = |v|
        S.gdot.resize(H * N), S.gvan.resize(H * N);
        graph_->read_scores(l, S.gdot.data(), S.gvan.data());
        for (size_t i = 0; i < H * N; ++i) {
            S.tar[i] = -double(S.gdot[i]);
            S.van[i] = double(S.gvan[i]);
        }
    } else if (use_tar) {
        tar_layer(S, l, P, R, M, p, van_rows);
    }
    if (use_van) {
        if (!van_rows && !graph) van_layer(S, l);
        if (kernel > 1)
            for (size_t h = 0; h < H; ++h)
                pool_van(S, S.van.data() + h * N, F + h * M, P + h * M, nx, p, kernel);
    }
    if (record_) record_layer(S, l, use_tar, use_van);
    for (size_t h = 0; h < H; ++h)
        choose(S, h, r[h] * p, keep, alpha, use_tar, use_van, out + h * keep);
}

// Diagnostics (scripts/retention.py): this layer's scores as the choice will read them, NaN where none
// was computed (TaR of the recent slots, a half the policy leaves out). Layers write disjoint rows.
void KVPass::record_layer(const Scratch &S, size_t l, bool use_tar, bool use_van) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size();
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (size_t i = 0; i < H * N; ++i) {  // TaR as the paper writes it: the mean over the r recent frames
        rec_tar_[l * H * N + i] = use_tar && !S.mark[i] ? S.tar[i] / double(recent_[l * H + i / N]) : nan;
        rec_van_[l * H * N + i] = use_van ? S.van[i] : nan;
    }
}

// Mark head h's slots of the recent frames (frame >= recent_min_frame); every patch of each must be
// there, once. Returns the number of recent frames.
size_t KVPass::mark_recent(uint8_t *mark, const int32_t *frame, const int32_t *patch, size_t p, int recent_min_frame,
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
void KVPass::tar_layer(Scratch &S, size_t l, const int32_t *patch, const int32_t *rpos, size_t M, size_t p,
                       bool van_rows) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dk_);
    const LayerSrc &L = src_[l];
    std::fill(S.sum.begin(), S.sum.begin() + long(H * p * D), 0.0f);
    for (size_t n = 0; n < N; ++n) {
        uint8_t rec = 0, past = 0;
        for (size_t h = 0; h < H; ++h) (S.mark[h * N + n] ? rec : past) = 1;
        S.any_recent[n] = rec;
        S.any_past[n] = past;
    }
    float *u = S.unit.data(), *tmp = S.unit.data() + D, *row = S.raw.data();
    const float *c = nullptr, *s = nullptr;
    for (size_t n = 0; n < N; ++n) {
        prefetch_book(rpos, H, M, n, N);
        prefetch_book(patch, H, M, n, N);
        if (!S.any_recent[n]) continue;
        if (n + kAhead < N) {
            prefetch_row(L.k + size_t(slot_cells_[n + kAhead]) * L.k_row, L.k_row);
            if (van_rows) prefetch_row(L.v + size_t(slot_cells_[n + kAhead]) * L.v_row, L.v_row);
        }
        if (van_rows && !S.any_past[n]) van_row(S, L, n);  // rows with past slots: in the sweep below
        to_float(L.k_type, L.k + size_t(slot_cells_[n]) * L.k_row, row, H * D);
        for (size_t h = 0; h < H; ++h) {
            if (!S.mark[h * N + n]) continue;
            tables(rpos[h * M + n], c, s, tmp);
            const float norm = std::sqrt(unrotate(row + h * D, c, s, rl_, u));
            const float inv = norm > 1e-12f ? 1.0f / norm : 0.0f;  // cos = a.b / max(|a||b|, eps)
            float *sum = S.sum.data() + (h * p + size_t(patch[h * M + n])) * D;
            for (size_t d = 0; d < D; ++d) sum[d] += u[d] * inv;
        }
    }
    if (L.k_type == GGML_TYPE_F16)
        tar_past(S, L, reinterpret_cast<const uint16_t *>(L.k), patch, rpos, M, p, van_rows);
    else
        tar_past(S, L, reinterpret_cast<const float *>(L.k), patch, rpos, M, p, van_rows);
}

// TaR of the past slots, one fused un-rotate-and-dot each, straight from the cache's f16 or f32.
template <typename E>
void KVPass::tar_past(Scratch &S, const LayerSrc &L, const E *k, const int32_t *patch, const int32_t *rpos, size_t M,
                      size_t p, bool van_rows) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dk_), row = L.k_row / sizeof(E);
    float *tmp = S.unit.data() + D;
    const float *c = nullptr, *s = nullptr;
    for (size_t n = 0; n < N; ++n) {
        prefetch_book(rpos, H, M, n, N);
        prefetch_book(patch, H, M, n, N);
        if (!S.any_past[n]) continue;
        if (n + kAhead < N) {
            prefetch_row(L.k + size_t(slot_cells_[n + kAhead]) * L.k_row, L.k_row);
            if (van_rows) prefetch_row(L.v + size_t(slot_cells_[n + kAhead]) * L.v_row, L.v_row);
            prefetch_tables(rpos[n + kAhead]);  // the RoPE rows are as big as a head's key
        }
        if (van_rows) van_row(S, L, n);
        const E *x = k + size_t(slot_cells_[n]) * row;
        for (size_t h = 0; h < H; ++h) {
            if (S.mark[h * N + n]) continue;
            tables(rpos[h * M + n], c, s, tmp);
            float n2;
            const float dot =
                unrotate_dot(x + h * D, c, s, S.sum.data() + (h * p + size_t(patch[h * M + n])) * D, rl_, n2);
            const float norm = std::sqrt(n2);
            const float inv = norm > 1e-12f ? 1.0f / norm : 0.0f;
            // -(1/r) of this is the TaR score; only its rank within the head counts, so the constant
            // factor is left out.
            S.tar[h * N + n] = -double(dot) * inv;
        }
    }
}

// VaN of slot n of every head, from its V row (not transposed), read as stored.
void KVPass::van_row(Scratch &S, const LayerSrc &L, size_t n) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dv_);
    const uint8_t *v = L.v + size_t(slot_cells_[n]) * L.v_row;
    for (size_t h = 0; h < H; ++h)
        S.van[h * N + n] = std::sqrt(double(L.v_type == GGML_TYPE_F16
                                                ? sum_squares(reinterpret_cast<const uint16_t *>(v) + h * D, int(D))
                                                : sum_squares(reinterpret_cast<const float *>(v) + h * D, int(D))));
}

// VaN of every slot of every head: one sweep over V rows, or over transposed V's dimension runs.
void KVPass::van_layer(Scratch &S, size_t l) const {
    const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(dv_);
    const LayerSrc &L = src_[l];
    if (!v_trans_) {
        for (size_t n = 0; n < N; ++n) van_row(S, L, n);
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
void KVPass::pool_van(Scratch &S, double *van, const int32_t *frame, const int32_t *patch, int nx, size_t p,
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
void KVPass::choose(Scratch &S, size_t h, size_t rp, size_t keep, double alpha, bool use_tar, bool use_van,
                    int32_t *out) const {
    const size_t N = slot_cells_.size();
    uint8_t *mark = S.mark.data() + h * N;
    const double *tar = S.tar.data() + h * N, *van = S.van.data() + h * N;
    uint64_t *key = S.keys.data();
    int32_t *slot = S.cand.data();
    const double *first = use_tar ? tar : van;
    // The candidates, the unmarked slots in slot order. Branch-free passes: which slots are in or out
    // is data, not a pattern a predictor learns.
    size_t nc = 0;
    for (size_t n = 0; n < N; ++n) {
        key[nc] = order_key(first[n]);
        slot[nc] = int32_t(n);
        nc += !mark[n];
    }
    size_t n_kept_past = keep - rp;
    if (use_tar && use_van) {
        long n_tar = long(std::floor(alpha * double(keep))) - long(rp);
        if (n_tar < 0) throw std::invalid_argument("alpha * |C| must cover the recent frames");
        const size_t nt = std::min(size_t(n_tar), nc);
        // Protected by TaR; the rest of the room goes to the highest VaN among the others.
        nc = take_best(key, slot, S.radix.data(), mark, nc, nt, van);
        n_kept_past -= nt;
    }
    take_best(key, slot, S.radix.data(), mark, nc, std::min(n_kept_past, nc), nullptr);
    int32_t *all = S.slots.data();
    size_t k = 0;
    for (size_t n = 0; n < N; ++n) {
        all[k] = int32_t(n);
        k += mark[n] != 0;
    }
    if (k == keep) std::copy(all, all + k, out);
    if (k != keep) throw std::logic_error("selection kept " + std::to_string(k) + " slots, not " + std::to_string(keep));
}

// In place: for every layer and head, slot j <- kept[j] (a forward move, kept[j] >= j), keys turned
// from their stored rotation to position P + j on the way; then the cells after P + C are freed.
// Nothing here can fail: apply() checked every input before.
void KVPass::apply_direct(const int32_t *K, size_t C, const int32_t *RP, size_t M) {
    for_layers(n_layer_, scratch_, [&](size_t l, Scratch &S) {
        move_layer(l, S, K + l * size_t(n_head_) * C, C, RP + l * size_t(n_head_) * M, M);
    }, true);
    finish_direct(C);
}

// Layer l in place: kept = [H][C] slots of this layer, rp = their stored rotations, head h's at h * M.
// One sweep over the cells for K and V rows alike, the rows of a few cells ahead asked for early (the
// sources to read, the destinations to write, the RoPE rows).
void KVPass::move_layer(size_t l, Scratch &S, const int32_t *kept, size_t C, const int32_t *rp, size_t M) const {
    const size_t H = size_t(n_head_), P0 = size_t(n_prefix_);
    const LayerSrc &Ls = src_[l];
    const size_t kb = Ls.k_row / H, vb = Ls.v_row / H;
    const bool v_rows = !v_trans_;
    float *tmp = S.unit.data();
    auto sweep = [&](auto elem) {
        using E = decltype(elem);
        for (size_t j = 0; j < C; ++j) {
            if (j + kAhead < C) {
                const size_t ja = P0 + j + kAhead;
                prefetch_row_for_write(Ls.k + ja * Ls.k_row, Ls.k_row);
                if (v_rows) prefetch_row_for_write(Ls.v + ja * Ls.v_row, Ls.v_row);
                for (size_t h = 0; h < H; ++h) {
                    const size_t a = size_t(kept[h * C + j + kAhead]);
                    prefetch_row(Ls.k + (P0 + a) * Ls.k_row + h * kb, kb);
                    if (v_rows) prefetch_row(Ls.v + (P0 + a) * Ls.v_row + h * vb, vb);
                    prefetch_tables(int(ja) - rp[h * M + a]);
                }
            }
            if (j + kBook < C)
                for (size_t h = 0; h < H; ++h)
                    prefetch_row(reinterpret_cast<const uint8_t *>(rp + h * M + kept[h * C + j + kBook]), 1);
            uint8_t *dst = Ls.k + (P0 + j) * Ls.k_row;
            for (size_t h = 0; h < H; ++h) {
                const size_t s = size_t(kept[h * C + j]);
                const int delta = int(P0 + j) - rp[h * M + s];
                if (v_rows && s != j)
                    copy_bytes(Ls.v + (P0 + j) * Ls.v_row + h * vb, Ls.v + (P0 + s) * Ls.v_row + h * vb, vb);
                if (s == j && delta == 0) continue;
                const uint8_t *from = Ls.k + (P0 + s) * Ls.k_row + h * kb;
                if (delta == 0)
                    copy_bytes(dst + h * kb, from, kb);
                else
                    turn_key<E>(from, dst + h * kb, delta, tmp);
            }
        }
    };
    if (Ls.k_type == GGML_TYPE_F16)
        sweep(uint16_t{});
    else
        sweep(float{});
    if (v_rows) return;
    const size_t Dv = size_t(dv_);
    auto runs = [&](auto elem) {
        using T = decltype(elem);
        for (size_t d = 0; d < H * Dv; ++d) {
            T *run = reinterpret_cast<T *>(Ls.v + d * Ls.v_row) + P0;
            const int32_t *kh = kept + (d / Dv) * C;
            for (size_t j = 0; j < C; ++j) run[j] = run[kh[j]];
        }
    };
    if (Ls.v_elem == 2)
        runs(uint16_t{});
    else
        runs(uint32_t{});
}

// The kept cells are in place: free the rest of the sequence's cells (positions P + C on).
void KVPass::finish_direct(size_t C) {
    llama_memory_seq_rm(llama_get_memory(ctx_), seq_, n_prefix_ + llama_pos(C), -1);
    take_fingerprint(size_t(n_prefix_) + C);
}

// Layer 0's K rows of a few cells the pass just wrote (first, middle, last): compared at the next
// read_direct, a cheap witness that nothing re-packed the sequence in between.
void KVPass::take_fingerprint(size_t cells) {
    const LayerSrc &L = src_[0];
    fp_cells_ = {0, cells / 2, cells - 1};
    fp_.resize(fp_cells_.size() * L.k_row);
    for (size_t i = 0; i < fp_cells_.size(); ++i)
        GraphPass::read_bytes(cap_->k(0), fp_cells_[i] * L.k_row, L.k_row, fp_.data() + i * L.k_row);
}

bool KVPass::fingerprint_matches() const {
    if (fp_cells_.empty()) return false;
    ggml_tensor *k = cap_->k(0);
    const size_t row = k->nb[1];
    if (fp_.size() != fp_cells_.size() * row) return false;
    std::vector<uint8_t> now(row);
    for (size_t i = 0; i < fp_cells_.size(); ++i) {
        GraphPass::read_bytes(k, fp_cells_[i] * row, row, now.data());
        if (std::memcmp(fp_.data() + i * row, now.data(), row) != 0) return false;
    }
    return true;
}

void KVPass::apply_portable(const int32_t *K, size_t C, const int32_t *NPOS, const int32_t *RP, size_t M, bool rerotate) {
    const size_t L = n_layer_, NP = prefix_cells_.size(), cells = NP + C;
    fp_cells_.clear();  // set_data re-packs the sequence: the next direct read checks it in full
    // Reindex mode moves a sliding-window cache along with the sequence (plan_sliding); every other part
    // after the compressed cache goes back as it was.
    const bool move_sliding = rerotate && !view_.other_caches.empty() && C > 0;
    const int sliding_delta = move_sliding ? NPOS[C - 1] - view_.pos[size_t(slot_cells_.back())] : 0;
    const size_t sliding_out = move_sliding ? plan_sliding(sliding_delta) : 0;
    const size_t rest_begin = move_sliding ? view_.other_caches[0].end : view_.carried_begin;
    const size_t out_size =
        8 + edge::cache_size_for(view_, view_.mrope, cells) + sliding_out + (view_.size - rest_begin);
    if (out_size > b_.size()) throw std::runtime_error("compressed state exceeds the pass buffer");

    py::gil_scoped_release nogil;
    uint8_t *b = b_.data();
    const uint8_t *a = a_.data();
    const size_t H = size_t(n_head_);
    size_t w = edge::write_cells(b, view_, a, prefix_cells_, slot_cells_, K, C, NPOS);
    w = edge::layer_offsets(view_, cells, w, k_at_, v_at_);
    if (move_sliding) {
        // Every moved key of the sliding cache turns by the same delta: one table (plan_sliding).
        float *tmp = scratch_[0].unit.data();
        auto turn = [&](int k_type, const uint8_t *from, uint8_t *to) {
            if (k_type == GGML_TYPE_F16)
                move_key(reinterpret_cast<const uint16_t *>(from), reinterpret_cast<uint16_t *>(to), sliding_c_.data(),
                         sliding_s_.data(), sliding_delta > 0, rl_, tmp);
            else
                move_key(reinterpret_cast<const float *>(from), reinterpret_cast<float *>(to), sliding_c_.data(),
                         sliding_s_.data(), sliding_delta > 0, rl_, tmp);
        };
        if (edge::write_sliding(b + w, view_.other_caches[0], a, sliding_keep_, n_prefix_, sliding_delta, H, turn) !=
            sliding_out)
            throw std::logic_error("re-indexed sliding-window cache size mismatch");
    }
    const size_t rest_at = w + sliding_out;
    w = rest_at + (view_.size - rest_begin);
    if (w != out_size) throw std::logic_error("compressed state size mismatch");
    // The parts after the compressed cache (the sliding-window cache in keep mode, the recurrent state)
    // go back as they were.
    std::memcpy(b + rest_at, a + rest_begin, view_.size - rest_begin);
    // The recurrent state takes the last kept slot's position, which reindex mode lowers. Its data stay as
    // they were.
    if (view_.has_recurrent && C > 0) edge::set_recurrent_pos(b + rest_at, view_, rest_begin, NPOS[C - 1]);
    for_layers(L, scratch_, [&](size_t l, Scratch &S) {
        // Layer l's keys: row j = head h's kept token, re-rotated from its stored rotation to NPOS[j] if asked.
        float *tmp = S.unit.data();
        edge::write_keys(b + k_at_[l], view_, l, a, prefix_cells_, slot_cells_, K, C, H,
                         [&](const uint8_t *from, uint8_t *to, size_t hb, size_t h, int32_t slot, size_t j) {
                             const int delta = NPOS[j] - RP[(l * H + h) * M + size_t(slot)];
                             if (!rerotate || delta == 0) {  // bit-exact when nothing turns
                                 std::memcpy(to, from, hb);
                                 return;
                             }
                             turn_key(from, to, view_.layers[l].k_type, delta, tmp);
                         });
        edge::write_values(b + v_at_[l], view_, l, a, prefix_cells_, slot_cells_, K, C, H);
    });
    if (llama_state_seq_set_data(ctx_, b, w, seq_) == 0) {
        // llama.cpp removed the sequence before failing: put the untouched original back.
        if (llama_state_seq_set_data(ctx_, a, size_a_, seq_) == 0)
            throw std::runtime_error("writing the compressed KV state failed and so did restoring it: memory lost");
        throw std::runtime_error("writing the compressed KV state failed; the memory was restored as it was");
    }
}

// Reindex mode on a sliding-window model (Gemma 3): the sliding layers' cache holds the sequence's last
// n_swa positions, llama.cpp's own window, and is not compressed. It moves with the end of the sequence:
// every video cell by the same delta (the compressed cache's new end minus its old one), keys re-rotated
// by delta with the sliding layers' RoPE, so each token keeps its distance to the next frame and the
// window shows what it showed. Video cells that would land in the system prompt's positions (a window
// longer than |C|) are dropped; the prompt's own cells, if still in the window, stay. Returns the
// section's bytes; plan_sliding checks everything write_sliding relies on.
size_t KVPass::plan_sliding(int delta) {
    const edge::CacheView &c = view_.other_caches[0];
    if (!sliding_rope_set_)
        throw std::runtime_error("the sliding-window layers' RoPE is not known (set_sliding_rope): cannot re-index");
    const size_t H = size_t(n_head_);
    for (const auto &L : c.layers) {
        if (L.k_type != GGML_TYPE_F16 && L.k_type != GGML_TYPE_F32)
            throw std::runtime_error(std::string("the sliding-window KV cache is ") + ggml_type_name(ggml_type(L.k_type)));
        if (L.k_row_bytes != H * size_t(dk_) * ggml_type_size(ggml_type(L.k_type)))
            throw std::runtime_error("the sliding-window cache's K rows do not match n_head_kv x head_dim");
    }
    sliding_keep_.clear();
    for (uint32_t i = 0; i < c.cell_count; ++i)
        if (c.pos[i] < n_prefix_ || c.pos[i] + delta >= n_prefix_) sliding_keep_.push_back(int32_t(i));
    sliding_c_.resize(size_t(rl_.n_rot));
    sliding_s_.resize(size_t(rl_.n_rot));
    fill_tables(sliding_rope_, delta < 0 ? -delta : delta, sliding_c_.data(), sliding_s_.data());
    return edge::cache_size_for(c, view_.mrope, sliding_keep_.size());
}

double KVPass::copy_ms(size_t n_bytes, int repeats) const {
    if (!graph_) throw std::logic_error("copy_ms measures the graph route's backend, which this pass does not use");
    py::gil_scoped_release nogil;
    return graph_->copy_ms(n_bytes, repeats);
}

py::array_t<float> KVPass::rows(int layer, bool keys) {
    if (layer < 0 || size_t(layer) >= n_layer_) throw std::out_of_range("layer");
    const size_t H = size_t(n_head_), N = slot_cells_.size(), D = size_t(keys ? dk_ : dv_);
    LayerSrc L = src_[size_t(layer)];
    std::vector<uint8_t> copy;  // the graph route's tensors (a GPU's), copied out: diagnostics only
    if (direct_ && graph_) {
        const ggml_tensor *t = keys ? cap_->k(size_t(layer)) : cap_->v(size_t(layer));
        copy.resize(ggml_nbytes(t));
        GraphPass::read_bytes(t, 0, copy.size(), copy.data());
        (keys ? L.k : L.v) = copy.data();
    }
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

// The video memory's bookkeeping (edge_runtime/memory.py SlotTable), kept in [L, H, M] int32 tables of which
// the first n slots of every (layer, head) are live. Native because a pass rewrites ~10^5 entries a table.
namespace {

size_t check_table(const I32Table &t, size_t L, size_t H, size_t M) {
    if (t.ndim() != 3 || (L && (size_t(t.shape(0)) != L || size_t(t.shape(1)) != H || size_t(t.shape(2)) != M)))
        throw std::invalid_argument("the slot tables must be [n_layer, n_head_kv, capacity], all alike");
    return size_t(t.shape(2));
}

}  // namespace

// SlotTable.keep: slot j of (l, h) becomes the old slot kept[l, h, j] in each table; rot_pos takes
// new_rot_pos[j] instead when given. Ascending lists (every policy's) compact forward in place (kept[j] >= j:
// nothing is overwritten before it is read); any other order goes through a copy. Returns the frame ids
// some (layer, head) still holds, ascending, seen on the way (the tables come from memory: one sweep).
I32Array keep_slots(I32Table frame, I32Table patch, I32Table rot_pos, size_t n, const I32Array &kept,
                    std::optional<I32Array> new_rot_pos) {
    const size_t L = size_t(frame.shape(0)), H = size_t(frame.shape(1)), M = check_table(frame, 0, 0, 0);
    check_table(patch, L, H, M);
    check_table(rot_pos, L, H, M);
    if (kept.ndim() != 3 || size_t(kept.shape(0)) != L || size_t(kept.shape(1)) != H || size_t(kept.shape(2)) > n ||
        n > M)
        throw std::invalid_argument("kept must be [n_layer, n_head_kv, C <= n_slots]");
    const size_t C = size_t(kept.shape(2));
    if (new_rot_pos && (new_rot_pos->ndim() != 1 || size_t(new_rot_pos->shape(0)) != C))
        throw std::invalid_argument("new_rot_pos must be [C]");
    const int32_t *K = kept.data();
    for (size_t i = 0; i < L * H * C; ++i)
        if (K[i] < 0 || size_t(K[i]) >= n) throw std::invalid_argument("kept holds a slot out of range");
    int32_t *F = frame.mutable_data(), *P = patch.mutable_data(), *R = rot_pos.mutable_data();
    const int32_t *NR = new_rot_pos ? new_rot_pos->data() : nullptr;
    // Each head's slots are in time order: its frames lie between its first slot's and its last's.
    int32_t lo = INT32_MAX, hi = INT32_MIN;
    for (size_t lh = 0; lh < L * H && n > 0; ++lh) lo = std::min(lo, F[lh * M]), hi = std::max(hi, F[lh * M + n - 1]);
    std::vector<uint8_t> seen(C > 0 ? size_t(int64_t(hi) - lo) + 1 : 0, 0);
    std::vector<int32_t> copy;
    for (size_t lh = 0; lh < L * H; ++lh) {
        const int32_t *k = K + lh * C;
        int32_t *f = F + lh * M, *p = P + lh * M, *r = R + lh * M;
        bool ascending = true;
        for (size_t j = 1; j < C && ascending; ++j) ascending = k[j] > k[j - 1];
        for (int32_t *t : {f, p, r}) {
            if (t == r && NR) {
                std::copy(NR, NR + C, t);
                continue;
            }
            if (ascending) {
                for (size_t j = 0; j < C; ++j) t[j] = t[k[j]];
                continue;
            }
            copy.assign(t, t + n);
            for (size_t j = 0; j < C; ++j) t[j] = copy[size_t(k[j])];
        }
        for (size_t j = 0; j < C; ++j) seen[size_t(f[j] - lo)] = 1;
    }
    std::vector<int32_t> ids;
    for (size_t i = 0; i < seen.size(); ++i)
        if (seen[i]) ids.push_back(lo + int32_t(i));
    I32Array out(py::ssize_t(ids.size()));
    std::copy(ids.begin(), ids.end(), out.mutable_data());
    return out;
}

// A sequence's state of a context, part by part, as parse_state reads it: what the session sizes its
// bookkeeping by (the layers and heads of the cache it compresses) and what tests pin llama.cpp's layout with.
py::dict state_parts(uintptr_t ctx_address, bool mrope, bool rows, int seq_id) {
    auto *ctx = reinterpret_cast<llama_context *>(ctx_address);
    const edge::StateLayout layout = edge::layout_of(llama_get_model(ctx), mrope);
    std::vector<uint8_t> blob(llama_state_seq_get_size(ctx, seq_id));
    blob.resize(llama_state_seq_get_data(ctx, blob.data(), blob.size(), seq_id));
    StateView v;
    edge::parse_state(blob.data(), blob.size(), layout, v);
    auto cache = [&](const edge::CacheView &c) {
        py::dict d;
        if (rows) {  // every layer's K and V as float32 [cells, n_embd_k or n_embd_v], cells in blob order
            py::list ks, vs;
            for (const auto &L : c.layers) {
                const size_t ek = ggml_type_size(ggml_type(L.k_type)), nk = L.k_row_bytes / ek;
                py::array_t<float> k({py::ssize_t(c.cell_count), py::ssize_t(nk)});
                to_float(L.k_type, blob.data() + L.k_offset, k.mutable_data(), c.cell_count * nk);
                ks.append(k);
                const size_t nv = c.v_trans ? L.n_embd_v : L.v_row_bytes / ggml_type_size(ggml_type(L.v_type));
                py::array_t<float> v({py::ssize_t(c.cell_count), py::ssize_t(nv)});
                float *o = v.mutable_data();
                if (!c.v_trans) {
                    to_float(L.v_type, blob.data() + L.v_offset, o, c.cell_count * nv);
                } else {
                    for (size_t dim = 0; dim < nv; ++dim)
                        for (size_t i = 0; i < c.cell_count; ++i)
                            to_float(L.v_type, blob.data() + L.v_offset + (dim * c.cell_count + i) * L.v_elem_bytes,
                                     o + i * nv + dim, 1);
                }
                vs.append(v);
            }
            d["keys"] = ks;
            d["values"] = vs;
        }
        d["bytes"] = c.end - c.begin;
        d["positions"] = c.pos;
        d["v_trans"] = c.v_trans != 0;
        std::vector<uint64_t> k_rows, v_rows;
        std::vector<std::string> k_types;
        for (const auto &L : c.layers) {
            k_rows.push_back(L.k_row_bytes);
            v_rows.push_back(c.v_trans ? uint64_t(L.v_elem_bytes) * L.n_embd_v : L.v_row_bytes);
            k_types.push_back(ggml_type_name(ggml_type(L.k_type)));
        }
        d["k_row_bytes"] = k_rows;
        d["v_row_bytes"] = v_rows;
        d["k_types"] = k_types;
        return d;
    };
    py::list caches;
    caches.append(cache(v));
    for (const auto &c : v.other_caches) caches.append(cache(c));
    py::dict out;
    out["bytes"] = v.size;
    out["caches"] = caches;
    if (v.has_recurrent) {
        py::dict r;
        r["bytes"] = v.recurrent.end - v.recurrent.begin;
        r["cells"] = v.recurrent.cell_count;
        r["n_layer"] = v.recurrent.n_layer;
        r["records"] = v.recurrent.n_records;
        out["recurrent"] = r;
    } else {
        out["recurrent"] = py::none();
    }
    return out;
}

}  // namespace edge
