// GraphPass: the pass's O(KV bytes) work as ggml graphs, computed by the backend that owns llama.cpp's KV
// tensors (CUDA, Vulkan, Metal, ... or the CPU), so a GPU cache never travels through host memory.
//
// Two graphs a pass, both over every layer at once:
//   score  per layer and KV head: keys un-rotated to position 0 (rope at minus the stored position),
//          normalised (l2_norm), summed per patch over the recent frames (get_rows + sum_rows), and each
//          slot's dot with its patch's sum (TaR, up to a constant factor); value norms (VaN)
//   move   per layer and KV head: the kept slots gathered (get_rows), keys turned by their new position
//          minus the stored one (rope), and written into cells P..P+C (cpy into views of the cache)
// Only the scores, [L][H][N] floats, come back to the host: the O(tokens) selection stays in KVPass's
// native code, so the kept sets are chosen by the very code that chooses them on a CPU cache.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "capture.hpp"
#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"

namespace edge {

// What the graphs need to know of the cache and its RoPE (fixed for the memory's life).
struct GraphGeometry {
    int n_head = 0, dk = 0, dv = 0;
    int n_rot = 0, rope_mode = 0;  // ggml's rope mode: 0 normal, GGML_ROPE_TYPE_NEOX
    float freq_base = 10000.0f, freq_scale = 1.0f;
    int n_ctx_orig = 0;
    bool v_trans = false;  // V stored transposed (no flash attention): element (d, cell) at d * kv_size + cell
    int n_threads = 1;     // a CPU backend's threads
};

// The bookkeeping a score graph reads, for every layer (tables [L][H][M], the first N slots of a head live).
struct ScoreInputs {
    size_t P = 0, N = 0, M = 0, p = 0;  // prefix cells, slots, table stride, patches a frame
    const int32_t *frame = nullptr, *patch = nullptr, *rot_pos = nullptr;
    const uint8_t *marks = nullptr;     // [L][H][N]: recent slots
    const size_t *recent = nullptr;     // [L][H]: recent frames
};

class GraphPass {
  public:
    // A GraphPass on the backend of the captured tensors' buffers, or nullptr with `why` said.
    static std::unique_ptr<GraphPass> make(const KVCapture &cap, const GraphGeometry &g, std::string &why);
    ~GraphPass();
    GraphPass(const GraphPass &) = delete;
    GraphPass &operator=(const GraphPass &) = delete;

    // "" when the backend runs every op of both graphs, V either way (asked before the first pass), else
    // which op it lacks.
    std::string probe(size_t p);
    // Whether V is stored transposed: what the verified state says (read_direct), before each pass.
    void set_v_trans(bool v_trans) { g_.v_trans = v_trans; }
    // Computes every layer's TaR dots and VaN on the device; read them with read_scores.
    void score(const ScoreInputs &in);
    // Layer l's scores into dot[H][N] and van[H][N] (host floats).
    void read_scores(size_t l, float *dot, float *van) const;
    // Slot j of head h <- slot kept[l][h][j] (kept: [L][H][C]), its key turned from its stored rotation
    // (rot_pos [L][H][M]) to position P + j.
    void move(size_t P, size_t N, size_t C, const int32_t *kept, const int32_t *rot_pos, size_t M);

    // Bytes of a tensor as stored, wherever it lives.
    static void read_bytes(const ggml_tensor *t, size_t offset, size_t n, void *dst);
    // Diagnostics: median ms of a copy of n_bytes between two buffers of this backend (a device-to-device copy).
    double copy_ms(size_t n_bytes, int repeats) const;

    std::string backend_name() const;
    size_t compute_bytes() const;  // the backend's buffer the graphs ran in (device memory for a GPU)
    size_t host_bytes() const;     // host memory the graphs' inputs and scores take (O(slots))
    size_t builds() const { return builds_; }  // graphs built so far (the probe's included): reuse shows here

  private:
    // A graph kept while the pass's shape (its key) stays the same: rebuilt, and its buffer allocated, only
    // when the shape changes. Between passes of one memory the shape rarely does (N = |M| at every pass), so
    // the graph's nodes stay where they are: a CUDA backend then replays the graph it captured instead of
    // launching each kernel (its graphs are keyed by the first node, ggml-cuda.cu ggml_cuda_graph_get_key).
    struct Built {
        ggml_context *ctx = nullptr;  // the graph's tensors (metadata only: the allocator places their data)
        ggml_cgraph *gf = nullptr;
        std::vector<size_t> key;
        bool allocated = false;
    };

    GraphPass(const KVCapture &cap, const GraphGeometry &g, ggml_backend_t backend);
    ggml_context *begin(Built &b, std::vector<size_t> key, size_t n_tensors);
    ggml_cgraph *build_score(size_t P, size_t N, size_t p, size_t r_max);
    ggml_cgraph *build_move(size_t P, size_t N, size_t C);
    void allocate(Built &b, ggml_gallocr_t galloc);
    void compute(ggml_cgraph *gf, const char *which);
    ggml_tensor *input(ggml_context *ctx, ggml_type type, int64_t ne0, int64_t ne1 = 1, int64_t ne2 = 1,
                       int64_t ne3 = 1);
    ggml_tensor *keys(ggml_context *ctx, size_t l, size_t first, size_t n) const;    // [D, n, H], permuted view
    ggml_tensor *values(ggml_context *ctx, size_t l, size_t first, size_t n) const;  // [Dv, n, H], view or copy

    const KVCapture &cap_;
    GraphGeometry g_;
    size_t n_layer_;
    ggml_backend_t backend_ = nullptr;
    ggml_gallocr_t score_alloc_ = nullptr, move_alloc_ = nullptr;
    Built score_g_, move_g_;
    // Every layer's inputs in one tensor each (a layer reads a view), so a pass sets each once: one host to
    // device copy per kind, not one per layer (each a synchronised copy on a GPU).
    ggml_tensor *in_pos_ = nullptr, *in_ridx_ = nullptr, *in_rw_ = nullptr, *in_pidx_ = nullptr;  // score
    ggml_tensor *in_kept_ = nullptr, *in_turn_ = nullptr;                                          // move
    ggml_tensor *scores_ = nullptr;  // [N, H, L, 2] floats: every layer's TaR dots, then its VaN; one read
    // Host side, O(slots) (never O(KV bytes)): the inputs on their way to the device, the scores back.
    std::vector<int32_t> stage_pos_, stage_pidx_, stage_ridx_, stage_turn_;
    std::vector<float> stage_rw_, scores_host_;
    size_t builds_ = 0;
};

}  // namespace edge
