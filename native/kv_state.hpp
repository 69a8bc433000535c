// The one place that knows the byte layout of llama.cpp's sequence state
// (llama_state_seq_get_data / set_data) for the pinned llama-cpp-python 0.3.36: parsing it (parse_state)
// and writing it (the write_* functions the pass's portable write-back and the test hooks call).
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
// loudly instead of corrupting memory. The writers take what to keep from the caller (cells, the kept
// slot of each head) and how to turn a key (a callback): layout here, choice and rotation in the pass.
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

// ---------------------------------------------------------------------------------------------------
// Writing. `a` is the blob `s` was parsed from; the writers fill `out` and return the bytes they wrote.
// Cell lists are cell indices of s's first cache; K is the kept slots [L][H][C] (head h of layer l at
// (l * H + h) * C), slot n meaning cell slot_cells[n].

// The blob's start up to its first cache's layers: magic, seq_id, one stream of prefix.size() + C cells
// (the prefix cells as they were, then slot j = head (0, 0)'s kept token at position new_pos[j]), v_trans,
// n_layer. On M-RoPE models x and y move with the position, as the keys turn: (pos, y, x) stays in slot
// order.
inline size_t write_cells(uint8_t *out, const StateView &s, const uint8_t *a, const std::vector<int32_t> &prefix_cells,
                          const std::vector<int32_t> &slot_cells, const int32_t *K, size_t C, const int32_t *new_pos) {
    const size_t cells = prefix_cells.size() + C;
    size_t w = 0;
    auto put = [&](const void *src, size_t n) { std::memcpy(out + w, src, n); w += n; };
    auto put32 = [&](uint32_t v) { put(&v, 4); };
    put32(kStateMagic);
    put(&s.seq_id, 4);
    put32(1);
    put32(uint32_t(cells));
    const size_t rec = (s.cells_end - s.cell_offset[0]) / s.cell_count;
    for (int32_t c : prefix_cells) put(a + s.cell_offset[size_t(c)], rec);
    for (size_t j = 0; j < C; ++j) {
        const size_t src = size_t(slot_cells[size_t(K[j])]);
        std::memcpy(out + w, a + s.cell_offset[src], rec);  // head (0, 0)'s token: seq ids
        std::memcpy(out + w, &new_pos[j], 4);
        if (s.mrope) {
            const int32_t delta = new_pos[j] - s.pos[src];
            const int32_t xy[2] = {s.ext_x[src] + delta, s.ext_y[src] + delta};
            std::memcpy(out + w + kCellExtOffset, xy, 8);
        }
        w += rec;
    }
    put32(s.v_trans);
    put32(s.n_layer);
    return w;
}

// Where each layer's K and V sections go when the layers of `c` start at byte w with `cells` cells, so that
// workers can write their layers independently; returns the first byte after them.
inline size_t layer_offsets(const CacheView &c, size_t cells, size_t w, std::vector<size_t> &k_at,
                            std::vector<size_t> &v_at) {
    const size_t L = c.layers.size();
    k_at.resize(L);
    v_at.resize(L);
    for (size_t l = 0; l < L; ++l) {
        k_at[l] = w;
        w += 12 + c.layers[l].k_row_bytes * cells;
    }
    for (size_t l = 0; l < L; ++l) {
        const auto &LV = c.layers[l];
        v_at[l] = w;
        w += c.v_trans ? 12 + size_t(LV.v_elem_bytes) * LV.n_embd_v * cells : 12 + LV.v_row_bytes * cells;
    }
    return w;
}

// Layer l's K section: header, the prefix rows, then row j = head h's kept token. Each kept head's key goes
// through head(from, to, hb, h, slot, j) (hb = row bytes / H): copied or re-rotated by the caller.
template <typename F>
inline void write_keys(uint8_t *out, const StateView &s, size_t l, const uint8_t *a,
                       const std::vector<int32_t> &prefix_cells, const std::vector<int32_t> &slot_cells,
                       const int32_t *K, size_t C, size_t H, F &&head) {
    const auto &LV = s.layers[l];
    const size_t row = LV.k_row_bytes, hb = row / H;
    const uint8_t *src = a + LV.k_offset;
    std::memcpy(out, &LV.k_type, 4);
    std::memcpy(out + 4, &LV.k_row_bytes, 8);
    out += 12;
    for (int32_t c : prefix_cells) {
        std::memcpy(out, src + size_t(c) * row, row);
        out += row;
    }
    for (size_t j = 0; j < C; ++j, out += row)
        for (size_t h = 0; h < H; ++h) {
            const int32_t slot = K[(l * H + h) * C + j];
            head(src + size_t(slot_cells[size_t(slot)]) * row + h * hb, out + h * hb, hb, h, slot, j);
        }
}

// Layer l's V section: rows per head like K, or (transposed V) each dimension's run of kept cells.
inline void write_values(uint8_t *out, const StateView &s, size_t l, const uint8_t *a,
                         const std::vector<int32_t> &prefix_cells, const std::vector<int32_t> &slot_cells,
                         const int32_t *K, size_t C, size_t H) {
    const auto &LV = s.layers[l];
    const uint8_t *src = a + LV.v_offset;
    std::memcpy(out, &LV.v_type, 4);
    if (!s.v_trans) {
        const size_t row = LV.v_row_bytes, hb = row / H;
        std::memcpy(out + 4, &LV.v_row_bytes, 8);
        out += 12;
        for (int32_t c : prefix_cells) {
            std::memcpy(out, src + size_t(c) * row, row);
            out += row;
        }
        for (size_t j = 0; j < C; ++j, out += row)
            for (size_t h = 0; h < H; ++h)
                std::memcpy(out + h * hb, src + size_t(slot_cells[size_t(K[(l * H + h) * C + j])]) * row + h * hb, hb);
        return;
    }
    std::memcpy(out + 4, &LV.v_elem_bytes, 4);
    std::memcpy(out + 8, &LV.n_embd_v, 4);
    out += 12;
    const size_t cc = s.cell_count, dv = LV.n_embd_v / H;
    auto runs = [&](auto elem) {
        using T = decltype(elem);
        T *o = reinterpret_cast<T *>(out);
        for (size_t d = 0; d < LV.n_embd_v; ++d) {
            const T *run = reinterpret_cast<const T *>(src) + d * cc;
            for (int32_t c : prefix_cells) *o++ = run[c];
            const int32_t *kh = K + (l * H + d / dv) * C;
            for (size_t j = 0; j < C; ++j) *o++ = run[slot_cells[size_t(kh[j])]];
        }
    };
    if (LV.v_elem_bytes == 2)
        runs(uint16_t{});
    else
        runs(uint32_t{});
}

// A sliding-window cache `c` (a part of the blob `a`) keeping the cells `keep` (in blob order), the cells at
// or after position n_prefix moved by delta positions, their keys turned through
// turn(k_type, from, to) per head (H heads a row); the prompt's cells stay as they were.
template <typename F>
inline size_t write_sliding(uint8_t *out, const CacheView &c, const uint8_t *a, const std::vector<int32_t> &keep,
                            int32_t n_prefix, int delta, size_t H, F &&turn) {
    const size_t n = keep.size();
    size_t w = 0;
    auto put = [&](const void *src, size_t k) { std::memcpy(out + w, src, k); w += k; };
    const uint32_t one = 1, cells = uint32_t(n);
    put(&one, 4);
    put(&cells, 4);
    const size_t rec = (c.cells_end - c.cell_offset[0]) / c.cell_count;
    auto moves = [&](int32_t i) { return c.pos[size_t(i)] >= n_prefix; };  // video cells move, the prompt stays
    for (int32_t i : keep) {
        std::memcpy(out + w, a + c.cell_offset[size_t(i)], rec);
        if (moves(i)) {
            const int32_t pos = c.pos[size_t(i)] + delta;
            std::memcpy(out + w, &pos, 4);
        }
        w += rec;
    }
    put(&c.v_trans, 4);
    put(&c.n_layer, 4);
    for (const auto &L : c.layers) {
        put(a + L.k_offset - 12, 12);  // type, row bytes
        const size_t row = L.k_row_bytes, hb = row / H;
        for (int32_t i : keep) {
            const uint8_t *src = a + L.k_offset + size_t(i) * row;
            if (!moves(i) || delta == 0) {
                put(src, row);
                continue;
            }
            for (size_t h = 0; h < H; ++h) turn(L.k_type, src + h * hb, out + w + h * hb);
            w += row;
        }
    }
    for (const auto &L : c.layers) {
        put(a + L.v_offset - 12, 12);  // type, row bytes (or element bytes, n_embd_v)
        if (!c.v_trans) {
            for (int32_t i : keep) put(a + L.v_offset + size_t(i) * L.v_row_bytes, L.v_row_bytes);
            continue;
        }
        const size_t e = L.v_elem_bytes;
        for (size_t d = 0; d < L.n_embd_v; ++d)
            for (int32_t i : keep) put(a + L.v_offset + (d * c.cell_count + size_t(i)) * e, e);
    }
    return w;
}

// A recurrent state sits at the sequence's last position (the hybrid memory's seq_pos_min/max take it into
// account): give every cell of s's recurrent part, written at `rest` (= byte rest_begin of a), position pos.
inline void set_recurrent_pos(uint8_t *rest, const StateView &s, size_t rest_begin, int32_t pos) {
    for (size_t off : s.recurrent.pos_offset) std::memcpy(rest + (off - rest_begin), &pos, 4);
}

// The blob `a` (parsed into s) with its first cache's cells in the order `order` (cell indices, all of
// them), K and V rows alike, the cells from order[n_keep] on moved by `shift` positions; the other parts as
// they were. Returns the bytes written (= s.size).
inline size_t write_reordered(uint8_t *b, const StateView &s, const uint8_t *a, const std::vector<int32_t> &order,
                              size_t n_keep, int shift) {
    const size_t cc = s.cell_count;
    std::memcpy(b, a, s.cell_offset[0]);
    size_t w = s.cell_offset[0];
    const size_t rec = (s.cells_end - s.cell_offset[0]) / cc;
    for (size_t i = 0; i < cc; ++i, w += rec) {
        std::memcpy(b + w, a + s.cell_offset[size_t(order[i])], rec);
        if (i >= n_keep) {
            int32_t pos = s.pos[size_t(order[i])] + shift;
            std::memcpy(b + w, &pos, 4);
        }
    }
    std::memcpy(b + w, a + s.cells_end, 8);
    w += 8;
    for (const auto &LV : s.layers) {
        std::memcpy(b + w, a + LV.k_offset - 12, 12);
        w += 12;
        for (size_t i = 0; i < cc; ++i, w += LV.k_row_bytes)
            std::memcpy(b + w, a + LV.k_offset + size_t(order[i]) * LV.k_row_bytes, LV.k_row_bytes);
    }
    for (const auto &LV : s.layers) {
        std::memcpy(b + w, a + LV.v_offset - 12, 12);
        w += 12;
        if (!s.v_trans) {
            for (size_t i = 0; i < cc; ++i, w += LV.v_row_bytes)
                std::memcpy(b + w, a + LV.v_offset + size_t(order[i]) * LV.v_row_bytes, LV.v_row_bytes);
            continue;
        }
        const size_t e = LV.v_elem_bytes;
        for (size_t d = 0; d < LV.n_embd_v; ++d)
            for (size_t i = 0; i < cc; ++i, w += e)
                std::memcpy(b + w, a + LV.v_offset + (d * cc + size_t(order[i])) * e, e);
    }
    std::memcpy(b + w, a + s.carried_begin, s.carried_bytes());  // the other caches, the recurrent state
    w += s.carried_bytes();
    return w;
}

}  // namespace edge
