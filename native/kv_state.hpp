// The one place that knows the byte layout of llama.cpp's sequence state
// (llama_state_seq_get_data / set_data) for the pinned llama-cpp-python 0.3.36.
//
//   u32 magic 0xaf143cd8, i32 seq_id, then one part per memory, in the order llama.cpp writes them:
//     plain models:          one KV cache                     (llama_kv_cache::state_write)
//     sliding-window models: the global cache, then the sliding one  (llama_kv_cache_iswa::state_write)
//     hybrid models:         the attention KV cache, then the recurrent state  (llama_memory_hybrid)
//
//   A KV cache part:
//     u32 n_stream (1: unified cache), u32 cell_count (0: nothing else follows for this stream),
//     per cell: i32 pos, u32 n_seq_id, [12 bytes x, y, tok on M-RoPE models], i32 seq_id x n_seq_id
//     u32 v_trans, u32 n_layer (the layers of this cache only),
//     per layer: i32 k_type, u64 k_row_bytes, cell_count rows (row = n_head_kv * head_dim, head-major)
//     v_trans == 0: per layer i32 v_type, u64 v_row_bytes, cell_count rows
//     v_trans == 1: per layer i32 v_type, u32 v_elem_bytes, u32 n_embd_v, then n_embd_v runs of
//                   cell_count elements (dim-major)
//     The sliding cache writes only the cells its window still shows (pos > seq_pos_max - n_swa).
//
//   The recurrent part (llama_memory_recurrent::state_write, always written, also when empty):
//     u32 cell_count, per cell: i32 pos, u32 n_seq_id (0 for one sequence), i32 seq_id x n_seq_id,
//     u32 s_trans (always 0), u32 n_layer (all the model's layers), then for every layer that has one
//     an R record (i32 type, u64 row bytes, cell_count rows), then the S records alike.
//
// The pass compresses the first KV cache (the one every model has, holding every token: the global
// layers of a sliding-window model, the attention layers of a hybrid one) and carries the parts after it
// byte for byte. parse_state() rejects anything it does not consume exactly, so a layout change fails
// loudly instead of corrupting memory.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "ggml.h"
#include "llama.h"

namespace edge {

constexpr uint32_t kStateMagic = 0xaf143cd8u;
// M-RoPE cell extension (llama_kv_cell_ext, src/llama-kv-cells.h): i32 x, i32 y, i32 tok, right after
// n_seq_id. x, y: the token's width and height rotary positions; tok: -1 for embeddings (images).
constexpr size_t kCellExtOffset = 8;
constexpr size_t kCellExtBytes = 12;

// What parts a model's sequence state has, from the model itself (the blob does not say).
struct StateLayout {
    int n_caches = 1;        // KV caches: 2 for sliding-window models (global, then sliding)
    bool recurrent = false;  // a recurrent state after the caches (hybrid models)
    bool mrope = false;      // 12 extra bytes per KV cell (M-RoPE models)
};

// llama_model::create_memory: an interleaved sliding-window cache (llama_kv_cache_iswa) when the model
// has a sliding window, hybrid memory (KV cache + recurrent) for hybrid architectures.
inline StateLayout layout_of(const llama_model *model, bool mrope) {
    StateLayout s;
    s.n_caches = llama_model_n_swa(model) > 0 ? 2 : 1;
    s.recurrent = llama_model_is_hybrid(model);
    s.mrope = mrope;
    return s;
}

struct LayerView {
    int32_t k_type = 0;
    uint64_t k_row_bytes = 0;
    size_t k_offset = 0;  // first K row
    int32_t v_type = 0;
    uint64_t v_row_bytes = 0;     // v_trans == 0
    uint32_t v_elem_bytes = 0;    // v_trans == 1
    uint32_t n_embd_v = 0;        // v_trans == 1
    size_t v_offset = 0;
};

// One KV cache's part of the blob.
struct CacheView {
    size_t begin = 0, end = 0;          // its bytes: [begin, end)
    uint32_t cell_count = 0;
    std::vector<int32_t> pos;           // per cell, in blob order
    std::vector<int32_t> ext_x, ext_y;  // per cell, M-RoPE only: the extension's x and y
    std::vector<size_t> cell_offset;    // where each cell record starts
    size_t cells_end = 0;               // first byte after the cell records
    uint32_t v_trans = 0;
    uint32_t n_layer = 0;
    std::vector<LayerView> layers;
};

// The recurrent part (hybrid models): carried untouched, parsed only to know where it ends.
struct RecurrentView {
    size_t begin = 0, end = 0;
    uint32_t cell_count = 0;
    std::vector<size_t> pos_offset;     // where each cell's i32 position is
    uint32_t n_layer = 0;               // the model's layers, not only the recurrent ones
    uint32_t n_records = 0;             // R and S tensors written
};

// The whole blob. Its CacheView fields are the first KV cache's: the one the pass compresses. The parts
// after it (other caches, the recurrent state) are carried: bytes [carried_begin, size).
struct StateView : CacheView {
    int32_t seq_id = 0;
    bool mrope = false;
    std::vector<CacheView> other_caches;  // the sliding-window cache of iSWA models
    bool has_recurrent = false;
    RecurrentView recurrent;
    size_t carried_begin = 0;             // = end of the first cache
    size_t size = 0;                      // bytes consumed: the whole blob

    size_t carried_bytes() const { return size - carried_begin; }
    size_t cell_bytes() const { return mrope ? 12 + kCellExtBytes : 12; }  // one sequence per cell
};

class Reader {
  public:
    Reader(const uint8_t *data, size_t size) : data_(data), size_(size) {}
    template <typename T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, data_ + off_, sizeof(T));
        off_ += sizeof(T);
        return v;
    }
    void skip(size_t n) { need(n); off_ += n; }
    size_t offset() const { return off_; }
    bool at_end() const { return off_ == size_; }

  private:
    void need(size_t n) const {
        if (n > size_ - off_) throw std::runtime_error("KV state blob is truncated at byte " + std::to_string(off_));
    }
    const uint8_t *data_;
    size_t size_;
    size_t off_ = 0;
};

// One KV cache part (llama_kv_cache::state_write), into `c`, reusing its vectors.
inline void parse_cache(Reader &r, bool mrope, CacheView &c) {
    c.begin = r.offset();
    const uint32_t n_stream = r.get<uint32_t>();
    if (n_stream != 1)
        throw std::runtime_error("KV state has " + std::to_string(n_stream) + " streams; only a unified cache is supported");
    c.cell_count = r.get<uint32_t>();
    c.pos.resize(c.cell_count);
    c.cell_offset.resize(c.cell_count);
    c.ext_x.resize(mrope ? c.cell_count : 0);
    c.ext_y.resize(mrope ? c.cell_count : 0);
    for (uint32_t i = 0; i < c.cell_count; ++i) {
        c.cell_offset[i] = r.offset();
        c.pos[i] = r.get<int32_t>();
        const uint32_t n_seq = r.get<uint32_t>();
        if (n_seq != 1) throw std::runtime_error("a KV cell of the sequence state belongs to " + std::to_string(n_seq) + " sequences");
        if (mrope) {
            c.ext_x[i] = r.get<int32_t>();
            c.ext_y[i] = r.get<int32_t>();
            r.skip(kCellExtBytes - 8);  // tok
        }
        r.skip(sizeof(int32_t));
    }
    c.cells_end = r.offset();
    c.v_trans = c.n_layer = 0;
    c.layers.clear();
    if (c.cell_count == 0) {  // an empty stream ends after its cell count
        c.end = r.offset();
        return;
    }
    c.v_trans = r.get<uint32_t>();
    c.n_layer = r.get<uint32_t>();
    c.layers.resize(c.n_layer);
    for (auto &L : c.layers) {
        L.k_type = r.get<int32_t>();
        L.k_row_bytes = r.get<uint64_t>();
        L.k_offset = r.offset();
        r.skip(L.k_row_bytes * c.cell_count);
    }
    for (auto &L : c.layers) {
        L.v_type = r.get<int32_t>();
        if (!c.v_trans) {
            L.v_row_bytes = r.get<uint64_t>();
            L.v_offset = r.offset();
            r.skip(L.v_row_bytes * c.cell_count);
        } else {
            L.v_elem_bytes = r.get<uint32_t>();
            L.n_embd_v = r.get<uint32_t>();
            L.v_offset = r.offset();
            r.skip(size_t(L.v_elem_bytes) * L.n_embd_v * c.cell_count);
        }
    }
    c.end = r.offset();
}

// The recurrent part (llama_memory_recurrent::state_write). The blob does not say which layers have R or
// S tensors; as the last part of the blob its records run to the end, each a valid ggml type and row size.
inline void parse_recurrent(Reader &r, RecurrentView &rv) {
    rv.begin = r.offset();
    rv.cell_count = r.get<uint32_t>();
    rv.pos_offset.resize(rv.cell_count);
    for (uint32_t i = 0; i < rv.cell_count; ++i) {
        rv.pos_offset[i] = r.offset();
        r.get<int32_t>();
        r.skip(size_t(r.get<uint32_t>()) * sizeof(int32_t));
    }
    if (r.get<uint32_t>() != 0) throw std::runtime_error("the recurrent state is transposed, a layout this parser does not know");
    rv.n_layer = r.get<uint32_t>();
    rv.n_records = 0;
    while (!r.at_end()) {
        const int32_t type = r.get<int32_t>();
        if (type < 0 || type >= GGML_TYPE_COUNT || ++rv.n_records > 2 * rv.n_layer)
            throw std::runtime_error("the recurrent state has records this parser does not know");
        r.skip(r.get<uint64_t>() * rv.cell_count);
    }
    rv.end = r.offset();
}

// Parse into `s`, reusing its vectors: a pass on a warm view allocates nothing.
inline void parse_state(const uint8_t *data, size_t size, const StateLayout &layout, StateView &s) {
    s.mrope = layout.mrope;
    Reader r(data, size);
    if (r.get<uint32_t>() != kStateMagic) throw std::runtime_error("KV state blob has an unknown magic");
    s.seq_id = r.get<int32_t>();
    parse_cache(r, layout.mrope, s);
    if (s.cell_count == 0) throw std::runtime_error("the sequence holds no KV cells");
    s.carried_begin = r.offset();
    s.other_caches.resize(size_t(layout.n_caches - 1));
    for (auto &c : s.other_caches) {
        parse_cache(r, layout.mrope, c);
        // the sliding window always shows the sequence's last position, so the state's sizing can rely on it
        if (c.cell_count == 0) throw std::runtime_error("the sliding-window cache holds none of the sequence's cells");
    }
    s.has_recurrent = layout.recurrent;
    if (layout.recurrent) parse_recurrent(r, s.recurrent);
    s.size = r.offset();
    if (s.size != size)
        throw std::runtime_error("KV state blob has " + std::to_string(size - s.size) +
                                 " bytes this parser does not know (a memory layout other than the model's?)");
}

// Bytes of one KV cache part with the layout of `c` and `cells` cells.
inline size_t cache_size_for(const CacheView &c, bool mrope, size_t cells) {
    size_t n = 8 + cells * (mrope ? 12 + kCellExtBytes : 12);
    if (cells == 0) return n;
    n += 8;
    for (const auto &L : c.layers) {
        n += 12 + L.k_row_bytes * cells;
        n += 12 + (c.v_trans ? size_t(L.v_elem_bytes) * L.n_embd_v * cells : L.v_row_bytes * cells);
    }
    return n;
}

// Bytes of the blob with `cells` cells in the first cache and the carried parts as they are now.
inline size_t state_size_for(const StateView &s, size_t cells) {
    return 8 + cache_size_for(s, s.mrope, cells) + s.carried_bytes();
}

// The most bytes the blob can take while the sequence holds at most `cells` cells: a sliding cache never
// holds more of the sequence's cells than the sequence has, and the recurrent part does not grow.
inline size_t state_capacity_for(const StateView &s, size_t cells) {
    size_t n = 8 + cache_size_for(s, s.mrope, cells);
    for (const auto &c : s.other_caches) n += cache_size_for(c, s.mrope, cells);
    if (s.has_recurrent) n += s.recurrent.end - s.recurrent.begin;
    return n;
}

}  // namespace edge
