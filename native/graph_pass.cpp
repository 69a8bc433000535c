// GraphPass (see graph_pass.hpp): the pass's score and move graphs on the backend that owns the KV tensors.
//
// Layout of llama.cpp's cache tensors (llama_kv_cache's constructor, src/llama-kv-cache.cpp): K of layer il is
// [n_embd_k_gqa, kv_size] with cell c's row at c * nb[1], heads side by side in it (head h at h * D); V is the
// same shape, or, without flash attention, stored transposed (element (d, cell) at d * kv_size + cell, what
// get_v/cpy_v view it as). The views below read both without a copy, except transposed V, whose cells a gather
// cannot take (get_rows gathers along dimension 1, a transposed V's cells run along dimension 0): it is made
// contiguous first, one layer at a time in the graph's own buffer.

#include "graph_pass.hpp"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>
#include <vector>

namespace edge {

namespace {

constexpr size_t kMaxNodes = 8192;  // a 64-layer model's two graphs, with room

// The first op of a graph the backend cannot run, or "".
std::string unsupported(ggml_backend_t backend, ggml_cgraph *gf) {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor *t = ggml_graph_node(gf, i);
        if (t->op == GGML_OP_NONE || t->op == GGML_OP_VIEW || t->op == GGML_OP_RESHAPE ||
            t->op == GGML_OP_PERMUTE || t->op == GGML_OP_TRANSPOSE)
            continue;
        if (!ggml_backend_supports_op(backend, t))
            return std::string("the ") + ggml_backend_name(backend) + " backend cannot run " + ggml_op_desc(t) +
                   " on " + ggml_type_name(t->src[0] ? t->src[0]->type : t->type);
    }
    return "";
}

}  // namespace

std::unique_ptr<GraphPass> GraphPass::make(const KVCapture &cap, const GraphGeometry &g, std::string &why) {
    why.clear();
    if (!cap.complete() || cap.n_layer() == 0) {
        why = "the evaluation callback has not seen every layer's K and V tensors";
        return nullptr;
    }
    ggml_backend_buffer_type_t buft = nullptr;
    for (size_t l = 0; l < cap.n_layer(); ++l)
        for (const ggml_tensor *t : {cap.k(l), cap.v(l)}) {
            if (!t->buffer) {
                why = "a KV tensor has no buffer";
                return nullptr;
            }
            ggml_backend_buffer_type_t b = ggml_backend_buffer_get_type(t->buffer);
            if (buft && b != buft) {
                why = "the KV cache is split over several devices (its layers live in different buffers)";
                return nullptr;
            }
            buft = b;
        }
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(buft);
    // Host buffer types of the CPU backend name no device (ggml-cpu registers none on them).
    if (!dev && ggml_backend_buft_is_host(buft)) dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (!dev) {
        why = std::string("no ggml device owns the KV cache's buffer type ") + ggml_backend_buft_name(buft);
        return nullptr;
    }
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    if (!backend) {
        why = std::string("could not start the ") + ggml_backend_dev_name(dev) + " backend";
        return nullptr;
    }
    if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        auto set = reinterpret_cast<ggml_backend_set_n_threads_t>(
            ggml_backend_reg_get_proc_address(ggml_backend_dev_backend_reg(dev), "ggml_backend_set_n_threads"));
        if (set) set(backend, std::max(g.n_threads, 1));
    }
    return std::unique_ptr<GraphPass>(new GraphPass(cap, g, backend));
}

GraphPass::GraphPass(const KVCapture &cap, const GraphGeometry &g, ggml_backend_t backend)
    : cap_(cap), g_(g), n_layer_(cap.n_layer()), backend_(backend) {
    score_alloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    move_alloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
}

GraphPass::~GraphPass() {
    for (Built *b : {&score_g_, &move_g_})
        if (b->ctx) ggml_free(b->ctx);
    if (score_alloc_) ggml_gallocr_free(score_alloc_);
    if (move_alloc_) ggml_gallocr_free(move_alloc_);
    if (backend_) ggml_backend_free(backend_);
}

std::string GraphPass::backend_name() const { return ggml_backend_name(backend_); }

size_t GraphPass::compute_bytes() const {
    return ggml_gallocr_get_buffer_size(score_alloc_, 0) + ggml_gallocr_get_buffer_size(move_alloc_, 0);
}

size_t GraphPass::host_bytes() const {
    return sizeof(int32_t) * (stage_pos_.capacity() + stage_pidx_.capacity() + stage_ridx_.capacity() +
                              stage_turn_.capacity()) +
           sizeof(float) * (stage_rw_.capacity() + scores_host_.capacity());
}

// A new context for a graph of this shape (the last one of b is freed).
ggml_context *GraphPass::begin(Built &b, std::vector<size_t> key, size_t n_tensors) {
    if (b.ctx) ggml_free(b.ctx);
    b = Built{};
    ggml_init_params ip{};
    ip.mem_size = ggml_tensor_overhead() * n_tensors + ggml_graph_overhead_custom(kMaxNodes, false);
    ip.no_alloc = true;
    b.ctx = ggml_init(ip);
    if (!b.ctx) throw std::runtime_error("ggml_init failed for the pass's graph");
    b.key = std::move(key);
    ++builds_;
    return b.ctx;
}

ggml_tensor *GraphPass::input(ggml_context *ctx, ggml_type type, int64_t ne0, int64_t ne1, int64_t ne2, int64_t ne3) {
    ggml_tensor *t = ggml_new_tensor_4d(ctx, type, ne0, ne1, ne2, ne3);
    ggml_set_input(t);
    return t;
}

// Head h's keys of cells first..first+n as [D, n, H] (dimension 1 the cells), a view of the cache.
ggml_tensor *GraphPass::keys(ggml_context *ctx, size_t l, size_t first, size_t n) const {
    ggml_tensor *k = cap_.k(l);
    const size_t es = ggml_type_size(k->type), row = k->nb[1];
    ggml_tensor *v = ggml_view_3d(ctx, k, g_.dk, g_.n_head, int64_t(n), size_t(g_.dk) * es, row, first * row);
    return ggml_permute(ctx, v, 0, 2, 1, 3);
}

// The same for values: a view of row-stored V; transposed V as a contiguous copy made by the graph.
ggml_tensor *GraphPass::values(ggml_context *ctx, size_t l, size_t first, size_t n) const {
    ggml_tensor *v = cap_.v(l);
    const size_t es = ggml_type_size(v->type);
    if (!g_.v_trans) {
        const size_t row = v->nb[1];
        return ggml_permute(ctx, ggml_view_3d(ctx, v, g_.dv, g_.n_head, int64_t(n), size_t(g_.dv) * es, row,
                                              first * row), 0, 2, 1, 3);
    }
    const size_t kv = size_t(v->ne[1]);
    ggml_tensor *t = ggml_view_3d(ctx, v, int64_t(n), g_.dv, g_.n_head, kv * es, size_t(g_.dv) * kv * es, first * es);
    return ggml_cont(ctx, ggml_permute(ctx, t, 1, 0, 2, 3));  // [n, Dv, H] -> [Dv, n, H]
}

void GraphPass::allocate(Built &b, ggml_gallocr_t galloc) {
    if (b.allocated) return;
    if (!ggml_gallocr_alloc_graph(galloc, b.gf))
        throw std::runtime_error("could not allocate the pass's graph on the " + backend_name() + " backend");
    b.allocated = true;
}

void GraphPass::compute(ggml_cgraph *gf, const char *which) {
    if (ggml_backend_graph_compute(backend_, gf) != GGML_STATUS_SUCCESS)
        throw std::runtime_error("the " + backend_name() + " backend failed the pass's " + which + " graph");
}

// The score graph for N slots (from cell P), p patches a frame and up to r_max recent frames a head.
ggml_cgraph *GraphPass::build_score(size_t P, size_t N, size_t p, size_t r_max) {
    const size_t L = n_layer_, H = size_t(g_.n_head), D = size_t(g_.dk), R = r_max * p;
    std::vector<size_t> key{P, N, p, r_max, size_t(g_.v_trans)};
    if (score_g_.gf && score_g_.key == key) return score_g_.gf;
    ggml_context *ctx = begin(score_g_, key, 64 * L + 16);
    ggml_cgraph *gf = score_g_.gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    in_pos_ = input(ctx, GGML_TYPE_I32, int64_t(H * N), int64_t(L));
    in_ridx_ = input(ctx, GGML_TYPE_I32, int64_t(R), int64_t(H), int64_t(L));
    in_rw_ = input(ctx, GGML_TYPE_F32, 1, int64_t(R), int64_t(H), int64_t(L));
    in_pidx_ = input(ctx, GGML_TYPE_I32, int64_t(N), int64_t(H), int64_t(L));
    scores_ = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, int64_t(N), int64_t(H), int64_t(L), 2);
    ggml_set_output(scores_);
    // Layer l's scores into scores_[.., .., l, which] (0: TaR dots, 1: VaN).
    const auto put = [&](ggml_tensor *t, size_t l, size_t which) {
        ggml_tensor *dst = ggml_view_2d(ctx, scores_, int64_t(N), int64_t(H), scores_->nb[1],
                                        l * scores_->nb[2] + which * scores_->nb[3]);
        ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, t, int64_t(N), int64_t(H)), dst));
    };
    for (size_t l = 0; l < L; ++l) {
        // Keys at position 0: rope by minus each slot's stored rotation ([D, 1, H*N]: one position a head's row).
        ggml_tensor *k = ggml_cast(ctx, keys(ctx, l, P, N), GGML_TYPE_F32);
        ggml_tensor *pos = ggml_view_1d(ctx, in_pos_, int64_t(H * N), l * in_pos_->nb[1]);
        ggml_tensor *u = ggml_rope_ext(ctx, ggml_reshape_3d(ctx, k, int64_t(D), 1, int64_t(H * N)), pos, nullptr,
                                       g_.n_rot, g_.rope_mode, g_.n_ctx_orig, g_.freq_base, g_.freq_scale,
                                       0.0f, 1.0f, 0.0f, 0.0f);
        // cos = a.b / max(|a||b|, eps): unit keys, a zero key stays zero (as the CPU kernels do).
        ggml_tensor *unit = ggml_reshape_3d(ctx, ggml_l2_norm(ctx, u, 1e-12f), int64_t(D), int64_t(N), int64_t(H));
        // The recent frames' unit keys per patch, [D, p, r, H] (slot of recent frame f, patch q at f * p + q;
        // a head with fewer recent frames pads with weight 0), summed over the frames: S [D, p, H].
        ggml_tensor *ridx = ggml_view_2d(ctx, in_ridx_, int64_t(R), int64_t(H), in_ridx_->nb[1], l * in_ridx_->nb[2]);
        ggml_tensor *rw = ggml_view_3d(ctx, in_rw_, 1, int64_t(R), int64_t(H), in_rw_->nb[1], in_rw_->nb[2],
                                       l * in_rw_->nb[3]);
        ggml_tensor *rec = ggml_mul(ctx, ggml_get_rows(ctx, unit, ridx), rw);
        rec = ggml_reshape_4d(ctx, rec, int64_t(D), int64_t(p), int64_t(r_max), int64_t(H));
        ggml_tensor *sum = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, rec, 1, 2, 0, 3)));  // [1, D, p, H]
        sum = ggml_reshape_3d(ctx, sum, int64_t(D), int64_t(p), int64_t(H));
        // Each slot's dot with the sum at its patch: TaR = -(1/r) of it.
        ggml_tensor *pidx = ggml_view_2d(ctx, in_pidx_, int64_t(N), int64_t(H), in_pidx_->nb[1], l * in_pidx_->nb[2]);
        put(ggml_sum_rows(ctx, ggml_mul(ctx, unit, ggml_get_rows(ctx, sum, pidx))), l, 0);  // [1, N, H]
        // VaN: each slot's value norm.
        ggml_tensor *v = ggml_cast(ctx, values(ctx, l, P, N), GGML_TYPE_F32);
        put(ggml_sqrt(ctx, ggml_sum_rows(ctx, ggml_sqr(ctx, v))), l, 1);  // [1, N, H]
    }
    return gf;
}

void GraphPass::score(const ScoreInputs &in) {
    const size_t L = n_layer_, H = size_t(g_.n_head), N = in.N, p = in.p;
    size_t r_max = 1;
    for (size_t i = 0; i < L * H; ++i) r_max = std::max(r_max, in.recent[i]);
    const size_t R = r_max * p;  // recent slots a head can hold
    ggml_cgraph *gf = build_score(in.P, N, p, r_max);
    allocate(score_g_, score_alloc_);
    stage_pos_.resize(L * H * N), stage_pidx_.resize(L * H * N);
    stage_ridx_.assign(L * H * R, 0), stage_rw_.assign(L * H * R, 0.0f);
    for (size_t l = 0; l < L; ++l) {
        for (size_t h = 0; h < H; ++h) {
            const size_t at = (l * H + h) * in.M, o = (l * H + h) * N;
            for (size_t n = 0; n < N; ++n) stage_pos_[o + n] = -in.rot_pos[at + n];
            std::copy(in.patch + at, in.patch + at + N, stage_pidx_.data() + o);
            const uint8_t *mark = in.marks + (l * H + h) * N;
            int32_t *ridx = stage_ridx_.data() + (l * H + h) * R;
            float *rw = stage_rw_.data() + (l * H + h) * R;
            size_t f = 0;
            int32_t last = 0;
            bool any = false;
            for (size_t n = 0; n < N; ++n) {
                if (!mark[n]) continue;
                if (any && in.frame[at + n] != last) ++f;
                last = in.frame[at + n], any = true;
                const size_t i = f * p + size_t(in.patch[at + n]);
                ridx[i] = int32_t(n);
                rw[i] = 1.0f;
            }
        }
    }
    ggml_backend_tensor_set(in_pos_, stage_pos_.data(), 0, ggml_nbytes(in_pos_));
    ggml_backend_tensor_set(in_pidx_, stage_pidx_.data(), 0, ggml_nbytes(in_pidx_));
    ggml_backend_tensor_set(in_ridx_, stage_ridx_.data(), 0, ggml_nbytes(in_ridx_));
    ggml_backend_tensor_set(in_rw_, stage_rw_.data(), 0, ggml_nbytes(in_rw_));
    compute(gf, "score");
    scores_host_.resize(size_t(ggml_nelements(scores_)));
    ggml_backend_tensor_get(scores_, scores_host_.data(), 0, ggml_nbytes(scores_));
}

void GraphPass::read_scores(size_t l, float *dot, float *van) const {
    const size_t n = size_t(scores_->ne[0] * scores_->ne[1]), L = n_layer_;
    std::copy_n(scores_host_.data() + l * n, n, dot);
    std::copy_n(scores_host_.data() + (L + l) * n, n, van);
}

// The move graph: C kept slots of N (from cell P) into cells P..P+C.
ggml_cgraph *GraphPass::build_move(size_t P, size_t N, size_t C) {
    const size_t L = n_layer_, H = size_t(g_.n_head), D = size_t(g_.dk), Dv = size_t(g_.dv);
    std::vector<size_t> key{P, N, C, size_t(g_.v_trans)};
    if (move_g_.gf && move_g_.key == key) return move_g_.gf;
    ggml_context *ctx = begin(move_g_, key, 32 * L + 8);
    ggml_cgraph *gf = move_g_.gf = ggml_new_graph_custom(ctx, kMaxNodes, false);
    in_kept_ = input(ctx, GGML_TYPE_I32, int64_t(C), int64_t(H), int64_t(L));  // kept: [L][H][C], as get_rows reads it
    in_turn_ = input(ctx, GGML_TYPE_I32, int64_t(H * C), int64_t(L));
    for (size_t l = 0; l < L; ++l) {
        ggml_tensor *kept = ggml_view_2d(ctx, in_kept_, int64_t(C), int64_t(H), in_kept_->nb[1], l * in_kept_->nb[2]);
        ggml_tensor *turn = ggml_view_1d(ctx, in_turn_, int64_t(H * C), l * in_turn_->nb[1]);
        // Keys: gathered (into the graph's buffer, so no cell is overwritten before it is read), turned by
        // their new position minus the stored one, written to P..P+C.
        ggml_tensor *k = ggml_get_rows(ctx, keys(ctx, l, P, N), kept);  // [D, C, H] f32
        k = ggml_rope_ext(ctx, ggml_reshape_3d(ctx, k, int64_t(D), 1, int64_t(H * C)), turn, nullptr,
                          g_.n_rot, g_.rope_mode, g_.n_ctx_orig, g_.freq_base, g_.freq_scale, 0.0f, 1.0f, 0.0f, 0.0f);
        k = ggml_reshape_3d(ctx, k, int64_t(D), int64_t(C), int64_t(H));
        ggml_build_forward_expand(gf, ggml_cpy(ctx, k, keys(ctx, l, P, C)));
        ggml_tensor *v = ggml_get_rows(ctx, values(ctx, l, P, N), kept);  // [Dv, C, H] f32
        ggml_tensor *dst;
        if (!g_.v_trans) {
            dst = values(ctx, l, P, C);
        } else {
            ggml_tensor *vt = cap_.v(l);
            const size_t es = ggml_type_size(vt->type), kv = size_t(vt->ne[1]);
            dst = ggml_view_3d(ctx, vt, int64_t(C), int64_t(Dv), int64_t(H), kv * es, Dv * kv * es, P * es);
            v = ggml_permute(ctx, v, 1, 0, 2, 3);  // [C, Dv, H], as the transposed cells lie
        }
        ggml_build_forward_expand(gf, ggml_cpy(ctx, v, dst));
    }
    return gf;
}

void GraphPass::move(size_t P, size_t N, size_t C, const int32_t *kept, const int32_t *rot_pos, size_t M) {
    const size_t L = n_layer_, H = size_t(g_.n_head);
    ggml_cgraph *gf = build_move(P, N, C);
    allocate(move_g_, move_alloc_);
    stage_turn_.resize(L * H * C);
    for (size_t l = 0; l < L; ++l)
        for (size_t h = 0; h < H; ++h) {
            const int32_t *K = kept + (l * H + h) * C;
            for (size_t j = 0; j < C; ++j)
                stage_turn_[(l * H + h) * C + j] = int32_t(P + j) - rot_pos[(l * H + h) * M + size_t(K[j])];
        }
    ggml_backend_tensor_set(in_kept_, kept, 0, ggml_nbytes(in_kept_));
    ggml_backend_tensor_set(in_turn_, stage_turn_.data(), 0, ggml_nbytes(in_turn_));
    compute(gf, "move");
}

std::string GraphPass::probe(size_t p) {
    const size_t n = 2 * p, c = p;
    const bool v_trans = g_.v_trans;
    std::string why;
    for (bool t : {false, true}) {
        g_.v_trans = t;
        why = unsupported(backend_, build_score(0, n, p, 1));
        if (why.empty()) why = unsupported(backend_, build_move(0, n, c));
        if (!why.empty()) break;
    }
    g_.v_trans = v_trans;
    return why;
}

void GraphPass::read_bytes(const ggml_tensor *t, size_t offset, size_t n, void *dst) {
    if (t->buffer && ggml_backend_buffer_is_host(t->buffer))
        std::copy_n(static_cast<const uint8_t *>(t->data) + offset, n, static_cast<uint8_t *>(dst));
    else
        ggml_backend_tensor_get(t, dst, offset, n);
}

double GraphPass::copy_ms(size_t n_bytes, int repeats) const {
    ggml_init_params ip{};
    ip.mem_size = 4 * ggml_tensor_overhead();
    ip.no_alloc = true;
    ggml_context *ctx = ggml_init(ip);
    ggml_tensor *a = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, int64_t(n_bytes));
    ggml_tensor *b = ggml_new_tensor_1d(ctx, GGML_TYPE_I8, int64_t(n_bytes));
    ggml_backend_buffer_t buf = ggml_backend_alloc_ctx_tensors(ctx, backend_);
    if (!buf) {
        ggml_free(ctx);
        throw std::runtime_error("could not allocate two buffers of " + std::to_string(n_bytes) + " bytes");
    }
    ggml_backend_buffer_clear(buf, 1);
    std::vector<double> ms;
    ggml_backend_tensor_copy(a, b);  // warm
    ggml_backend_synchronize(backend_);
    for (int i = 0; i < std::max(repeats, 1); ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        ggml_backend_tensor_copy(a, b);
        ggml_backend_synchronize(backend_);
        ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    ggml_backend_buffer_free(buf);
    ggml_free(ctx);
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

}  // namespace edge
