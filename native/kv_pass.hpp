// The compression pass (class KVPass, InfiniPot-V over llama.cpp's KV cache) and its parameters, plus the
// slot-table and state helpers the _native module exports (keep_slots, state_parts). How the pass works,
// direct vs portable: the comment at the top of kv_pass.cpp.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "capture.hpp"
#include "graph_pass.hpp"
#include "kv_state.hpp"
#include "llama.h"
#include "simd.hpp"

namespace edge {

namespace py = pybind11;

using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;
using I32Table = py::array_t<int32_t, py::array::c_style>;  // no forcecast: written in place, never a copy

// Rotary embedding as llama.cpp applies it to keys (normal: adjacent pairs; NeoX and M-RoPE: halves).
struct Rope {
    int type = LLAMA_ROPE_TYPE_NORM;
    int n_rot = 0;
    double freq_base = 10000.0;
    double freq_scale = 1.0;
};

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
    std::vector<float> raw;             // one cell's K row as stored, converted to float
    std::vector<float> unit;            // one turned key, then angle and rotation scratch
    std::vector<float> sum;             // [H][p][D] sums of the recent frames' unit keys
    std::vector<float> run, vacc;       // transposed V: one dimension over the slots; [H][N] sums of squares
    std::vector<double> tar, van;       // [H][N]
    std::vector<double> pooled, grid;
    std::vector<uint64_t> keys, radix;  // candidates' order keys; kth_key's scratch
    std::vector<int32_t> cand, slots;   // candidates' slots; the kept slots
    std::vector<uint8_t> mark;          // [H][N]: kept (recent, then chosen)
    std::vector<uint8_t> any_recent, any_past, present;
    std::vector<float> gdot, gvan;      // [H][N]: a graph pass's scores of one layer, as they came back
};

// Everything a pass needs to know of the model and the memory, fixed for the memory's life (as llama.cpp's
// *_params structs: one struct with defaults instead of a long argument list).
struct PassParams {
    int seq_id = 0;          // the llama.cpp sequence that holds the memory
    int n_prefix = 0;        // cells of the prompt before the video: never touched
    int n_head_kv = 0;       // of the cache the pass compresses (its first KV cache)
    int head_dim_k = 0, head_dim_v = 0;
    int rope_type = LLAMA_ROPE_TYPE_NORM;  // llama.cpp's LLAMA_ROPE_TYPE_*
    int n_rot = 0;           // rotated dimensions of a head
    double freq_base = 10000.0, freq_scale = 1.0;
    std::vector<int> rope_sections;  // M-RoPE: rotary pairs per section (t, h, w, e); empty otherwise
    bool mrope = false;      // cells carry M-RoPE's 12-byte position extension
    double sliding_freq_base = 0.0;  // > 0: a sliding-window cache (Gemma 3) moves along in reindex mode, this base
    int max_cells = 0;       // prefix + budget: every buffer is sized for it once
    int max_position = 1;    // RoPE tables cover positions below this (the context size)
    int n_threads = 1;
    bool in_place = true;    // may rewrite llama.cpp's own tensors (reindex mode, a capture)
    bool graph_on_cpu = false;  // a CPU cache too takes the ggml-graph route (measurements), not the CPU kernels
};

// InfiniPot-V's selection settings for one pass (TaR and VaN per layer and head; see select()).
struct ScoreParams {
    int nx = 0, ny = 0;          // the grid a frame's tokens are scored on
    int recent_min_frame = 0;    // frames with this index or later are the recent ones, kept whole
    int keep = 0;                // |C|
    double alpha = 0.5;          // share of |C| chosen by TaR (recent frames included)
    bool pool = false, use_tar = true, use_van = true;
    bool shared = false;         // one set for every (layer, head): the slots most per-head choices agree on
};

struct KVPassTestAccess;

class KVPass {
  public:
    KVPass(uintptr_t ctx, const PassParams &p, KVCapture *capture);

    // One whole pass, in the one order it can run in: read the cache (in place when it can, else a copy),
    // let `on_read` look at it (diagnostics), choose (InfiniPot-V's scores, or `choice` given as kept slots
    // [L, H, C] ascending per head), give the kept slots their positions, write back. The tables are the
    // memory's bookkeeping ([L, H, capacity], first n_video slots live), read only: the caller rewrites them
    // from the result. Positions: `new_pos` when given (tests), else reindex: right after the prompt; keep:
    // ending just below next_pos (llama.cpp wants new tokens at the highest position + 1), or, on M-RoPE,
    // each cell at its head-(0, 0) token's own position (a frame spans fewer positions than tokens).
    // Nothing has moved when it throws std::invalid_argument; a failed write-back restores the memory.
    py::dict compress(const I32Array &frame, const I32Array &patch, const I32Array &rot_pos, int n_video,
                      const py::object &choice, bool reindex, int next_pos, std::optional<I32Array> new_pos,
                      const py::object &on_read);

    // Why the in-place path cannot serve this memory ("" when it can), as the first pass found it.
    std::string in_place_refusal();

    // The sliding-window layers' RoPE, for re-indexing their cache (same type and rotated dimensions).
    void set_sliding_rope(double freq_base, double freq_scale);

    // Portable path: copy the sequence's state into buffer A and parse it; sizes A and B on the first call.
    void read();

    // Per cell of the state read last, M-RoPE only: the extension's (x, y) in slot order, [N, 2] (tests).
    I32Array slot_ext() const;

    // Whether the direct path can work on this context at all: "" if so, else why not (said once).
    std::string direct_support(KVCapture &cap);

    // Direct path: check that cell c holds position c for all n_prefix + n_video cells of the sequence and
    // point the pass at llama.cpp's tensors. Cheap at every pass (positions and cell count through the
    // public API); the first time, and after any mismatch, also against the parsed state, byte for byte.
    // Returns "" when the pass may run in place, else why not (the caller falls back to read()).
    std::string read_direct(int n_video);

    // Direct path: let the next select() move each layer in place right after choosing its tokens (while
    // the layer is still in the CPU's cache), with the positions apply() would give (n_prefix + j). The
    // apply() that follows must then pass that very selection; it only frees the cells after it.
    void plan_in_place();

    size_t n_slots() const { return slot_cells_.size(); }
    size_t n_layer() const { return n_layer_; }
    bool v_trans() const { return v_trans_; }
    // "direct": in place by the CPU kernels; "graph": in place by ggml graphs on the cache's backend (a GPU);
    // "portable": the state copied out and back.
    std::string path() const { return direct_ ? (graph_ ? "graph" : "direct") : "portable"; }
    // The backend the graph route runs on ("" when it does not run).
    std::string backend() const { return graph_ ? graph_->backend_name() : ""; }
    // The graph route's compute buffer (device memory on a GPU), 0 when it does not run.
    size_t device_bytes() const { return graph_ ? graph_->compute_bytes() : 0; }
    // The graph route's host memory (its inputs and scores, O(slots)) and how many graphs it built so far.
    size_t graph_host_bytes() const { return graph_ ? graph_->host_bytes() : 0; }
    size_t graph_builds() const { return graph_ ? graph_->builds() : 0; }
    // Diagnostics: median ms of a copy of n_bytes within the backend the graph route runs on.
    double copy_ms(size_t n_bytes, int repeats) const;
    size_t state_bytes() const { return state_bytes_; }
    size_t buffer_bytes() const { return a_.size() + b_.size(); }

    I32Array slot_positions() const;

    // [H, N, D] float32 keys / values of one layer in slot order, as stored (tests and diagnostics).
    py::array_t<float> keys(int layer) { return rows(layer, true); }
    py::array_t<float> values(int layer) { return rows(layer, false); }

    // Diagnostics: keep each select()'s scores (off in normal use: a copy of every score per pass).
    void record_scores(bool on) { record_ = on; }

    // The TaR and VaN scores of the last select() with record_scores(true): two [L, H, N] float64 arrays.
    py::tuple scores() const;

    // InfiniPot-V selection (or its TaR-only / VaN-only ablations) for every (layer, head).
    // slot_frame, slot_patch, rot_pos: [L, H, M >= N] int32 bookkeeping (frame id, patch y*nx+x, the
    // position the stored key is rotated at) of the N slots; the session's tables are read in place.
    // Returns kept slot indices [L, H, keep], ascending.
    I32Array select(const I32Array &slot_frame, const I32Array &slot_patch, const I32Array &rot_pos, int nx, int ny,
                    int recent_min_frame, int keep, double alpha, bool pool, bool use_tar, bool use_van);

    // Write back: the prefix cells as they were, then for slot j of head h the token kept[l, h, j], at cell
    // position new_pos[j]. With rerotate, keys turn from rot_pos to new_pos. Direct path: in place, then
    // the cells after the kept ones are freed. Portable path: through B; on failure the state read last
    // goes back and an exception says so. Every check runs before the first byte moves.
    void apply(const I32Array &kept, const I32Array &new_pos, const I32Array &rot_pos, bool rerotate);

    // Hand back exactly the state read last (a pass that failed half-way, or a test of the restore path).
    bool restore() { return llama_state_seq_set_data(ctx_, a_.data(), size_a_, seq_) != 0; }

  private:
    friend struct KVPassTestAccess;  // testing.cpp: the test hooks of edge_runtime._native_testing

    // RoPE: which pairs turn (M-RoPE), the per-position tables, turning one head's key.
    bool multi_rope() const { return rope_.type == LLAMA_ROPE_TYPE_MROPE || rope_.type == LLAMA_ROPE_TYPE_IMROPE; }
    void set_pair_turns(const std::vector<int> &sections);
    static double angle(const Rope &rope, double pos, int i);
    // Rows C and S (RopeLayout) for one position, with the model's RoPE or another one (sliding layers).
    void fill_tables(int pos, float *C, float *S) const { fill_tables(rope_, pos, C, S); }
    void fill_tables(const Rope &rope, int pos, float *C, float *S) const;
    void tables(int pos, const float *&C, const float *&S, float *tmp) const;
    void prefetch_tables(int pos) const;
    template <typename E> void turn_key(const uint8_t *src, uint8_t *dst, int delta, float *tmp) const;
    void turn_key(const uint8_t *src, uint8_t *dst, int type, int delta, float *tmp) const;

    // Reading: buffers, the direct path's checks.
    void size_scratch(bool v_trans);
    std::string verify_layout(int total);
    void check_layout() const;
    static size_t check_bookkeeping(const I32Array &x, size_t L, size_t H, size_t N);

    // Selection (InfiniPot-V: TaR on keys, VaN on values, per layer and head).
    I32Array shared_choice(const I32Array &per_head, size_t keep) const;
    static int pool_kernel(size_t l, size_t L);
    void select_layer(Scratch &S, size_t l, const int32_t *F, const int32_t *P, const int32_t *R, size_t M, int nx,
                      size_t p, size_t keep, double alpha, int kernel, bool use_tar, bool use_van, int32_t *out) const;
    void record_layer(const Scratch &S, size_t l, bool use_tar, bool use_van) const;
    size_t mark_recent(uint8_t *mark, const int32_t *frame, const int32_t *patch, size_t p, int recent_min_frame,
                       size_t l, size_t h) const;
    void tar_layer(Scratch &S, size_t l, const int32_t *patch, const int32_t *rpos, size_t M, size_t p,
                   bool van_rows) const;
    template <typename E>
    void tar_past(Scratch &S, const LayerSrc &L, const E *k, const int32_t *patch, const int32_t *rpos, size_t M,
                  size_t p, bool van_rows) const;
    void van_row(Scratch &S, const LayerSrc &L, size_t n) const;
    void van_layer(Scratch &S, size_t l) const;
    void pool_van(Scratch &S, double *van, const int32_t *frame, const int32_t *patch, int nx, size_t p,
                  int kernel) const;
    void choose(Scratch &S, size_t h, size_t rp, size_t keep, double alpha, bool use_tar, bool use_van,
                int32_t *out) const;

    // Writing back: in place (direct), through buffer B (portable).
    void apply_direct(const int32_t *K, size_t C, const int32_t *RP, size_t M);
    void move_layer(size_t l, Scratch &S, const int32_t *kept, size_t C, const int32_t *rp, size_t M) const;
    void finish_direct(size_t C);
    void take_fingerprint(size_t cells);
    bool fingerprint_matches() const;
    void apply_portable(const int32_t *K, size_t C, const int32_t *NPOS, const int32_t *RP, size_t M, bool rerotate);
    size_t plan_sliding(int delta);

    py::array_t<float> rows(int layer, bool keys);

    llama_context *ctx_;
    llama_seq_id seq_;
    int n_prefix_, n_head_, dk_, dv_;
    bool mrope_;
    int max_cells_;
    bool in_place_;
    KVCapture *capture_;
    bool direct_checked_ = false;
    std::string direct_why_;
    edge::StateLayout layout_;  // which parts the model's sequence state has
    Rope rope_;
    Rope sliding_rope_;  // the sliding-window layers' RoPE (Gemma 3: their own base, no scaling)
    bool sliding_rope_set_ = false;
    std::vector<int32_t> sliding_keep_;  // the sliding cache's cells a re-index keeps
    std::vector<float> sliding_c_, sliding_s_;  // its one rotation (every moved key turns by the same delta)
    RopeLayout rl_;
    std::vector<uint8_t> pair_turns_;  // per rotary pair: whether it turns with the position (M-RoPE e pairs do not)
    bool sections_known_ = false;      // M-RoPE: sections given, so keys can be re-rotated
    int table_n_ = 1;
    std::vector<float> rc_, rs_;
    // portable path
    std::vector<uint8_t> a_, b_;
    size_t size_a_ = 0;
    StateView view_;
    std::vector<size_t> k_at_, v_at_;
    // direct path
    KVCapture *cap_ = nullptr;
    std::unique_ptr<GraphPass> graph_;  // the graph route, when the cache is not in host memory (or graph_on_cpu)
    bool graph_on_cpu_ = false;
    StateView dview_;  // the layout of the last verified state (metadata only; its bytes are gone)
    bool verified_ = false;
    std::vector<size_t> fp_cells_;
    std::vector<uint8_t> fp_;
    bool plan_ = false, moved_ = false;  // plan_in_place() armed; select() moved the cells already
    size_t moved_keep_ = 0;
    double score_ms_ = 0;  // the graph route's score graph, device to host included (inside select_ms)
    std::vector<int32_t> moved_kept_;
    // this pass, either path
    bool direct_ = false, v_trans_ = false;
    size_t n_layer_ = 0, state_bytes_ = 0;  // state_bytes_: the sequence's state when the pass read it
    std::vector<LayerSrc> src_;
    std::vector<int32_t> prefix_cells_, slot_cells_;
    std::vector<uint8_t> marks_;  // [L][H][N] recent slots, marked by select() before scoring
    std::vector<size_t> recent_;  // [L][H] recent frames
    bool record_ = false;  // diagnostics: keep the scores of each select() (record_layer)
    mutable std::vector<double> rec_tar_, rec_van_;  // [L][H][N], written by the layers' threads, disjoint rows
    size_t rec_n_ = 0;
    std::vector<Scratch> scratch_;
};

// The video memory's bookkeeping (edge_runtime/memory.py SlotTable): SlotTable.keep on the [L, H, M] tables,
// in place; returns the frame ids some (layer, head) still holds, ascending (kv_pass.cpp says more).
I32Array keep_slots(I32Table frame, I32Table patch, I32Table rot_pos, size_t n, const I32Array &kept,
                    std::optional<I32Array> new_rot_pos);

// A sequence's state of a context, part by part, as parse_state reads it.
py::dict state_parts(uintptr_t ctx_address, bool mrope, bool rows, int seq_id);

}  // namespace edge
