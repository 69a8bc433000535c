// The one place that knows the byte layout of llama.cpp's sequence state
// (llama_state_seq_get_data / set_data) for the pinned llama-cpp-python 0.3.36.
//
//   u32 magic 0xaf143cd8, i32 seq_id,
//   u32 n_stream (1: unified cache), u32 cell_count,
//   per cell: i32 pos, u32 n_seq_id, [12 bytes x, y, tok on M-RoPE models], i32 seq_id x n_seq_id
//   u32 v_trans, u32 n_layer,
//   per layer: i32 k_type, u64 k_row_bytes, cell_count rows (row = n_head_kv * head_dim, head-major)
//   v_trans == 0: per layer i32 v_type, u64 v_row_bytes, cell_count rows
//   v_trans == 1: per layer i32 v_type, u32 v_elem_bytes, u32 n_embd_v, then n_embd_v runs of
//                 cell_count elements (dim-major)
//
// Sliding-window models (two caches) and recurrent state are not handled here yet: parse() rejects
// anything it does not consume exactly, so a layout change fails loudly instead of corrupting memory.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace edge {

constexpr uint32_t kStateMagic = 0xaf143cd8u;
// M-RoPE cell extension (llama_kv_cell_ext, src/llama-kv-cells.h): i32 x, i32 y, i32 tok, right after
// n_seq_id. x, y: the token's width and height rotary positions; tok: -1 for embeddings (images).
constexpr size_t kCellExtOffset = 8;
constexpr size_t kCellExtBytes = 12;

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

struct StateView {
    int32_t seq_id = 0;
    uint32_t cell_count = 0;
    bool mrope = false;                 // 12 extra bytes per cell; the blob does not say, the model does
    std::vector<int32_t> pos;           // per cell, in blob order
    std::vector<int32_t> ext_x, ext_y;  // per cell, M-RoPE only: the extension's x and y
    std::vector<size_t> cell_offset;    // where each cell record starts
    size_t cells_end = 0;               // first byte after the cell records
    uint32_t v_trans = 0;
    uint32_t n_layer = 0;
    std::vector<LayerView> layers;
    size_t size = 0;                    // bytes consumed: the whole blob
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

  private:
    void need(size_t n) const {
        if (off_ + n > size_) throw std::runtime_error("KV state blob is truncated at byte " + std::to_string(off_));
    }
    const uint8_t *data_;
    size_t size_;
    size_t off_ = 0;
};

// Parse into `s`, reusing its vectors: a pass on a warm view allocates nothing.
inline void parse_state(const uint8_t *data, size_t size, bool mrope, StateView &s) {
    s.mrope = mrope;
    Reader r(data, size);
    if (r.get<uint32_t>() != kStateMagic) throw std::runtime_error("KV state blob has an unknown magic");
    s.seq_id = r.get<int32_t>();
    uint32_t n_stream = r.get<uint32_t>();
    if (n_stream != 1) throw std::runtime_error("KV state has " + std::to_string(n_stream) + " streams; only a unified cache is supported");
    s.cell_count = r.get<uint32_t>();
    s.pos.resize(s.cell_count);
    s.cell_offset.resize(s.cell_count);
    s.ext_x.resize(mrope ? s.cell_count : 0);
    s.ext_y.resize(mrope ? s.cell_count : 0);
    for (uint32_t i = 0; i < s.cell_count; ++i) {
        s.cell_offset[i] = r.offset();
        s.pos[i] = r.get<int32_t>();
        uint32_t n_seq = r.get<uint32_t>();
        if (mrope) {
            s.ext_x[i] = r.get<int32_t>();
            s.ext_y[i] = r.get<int32_t>();
            r.skip(kCellExtBytes - 8);  // tok
        }
        r.skip(size_t(n_seq) * sizeof(int32_t));
    }
    s.cells_end = r.offset();
    s.v_trans = r.get<uint32_t>();
    s.n_layer = r.get<uint32_t>();
    s.layers.resize(s.n_layer);
    for (auto &L : s.layers) {
        L.k_type = r.get<int32_t>();
        L.k_row_bytes = r.get<uint64_t>();
        L.k_offset = r.offset();
        r.skip(L.k_row_bytes * s.cell_count);
    }
    for (auto &L : s.layers) {
        L.v_type = r.get<int32_t>();
        if (!s.v_trans) {
            L.v_row_bytes = r.get<uint64_t>();
            L.v_offset = r.offset();
            r.skip(L.v_row_bytes * s.cell_count);
        } else {
            L.v_elem_bytes = r.get<uint32_t>();
            L.n_embd_v = r.get<uint32_t>();
            L.v_offset = r.offset();
            r.skip(size_t(L.v_elem_bytes) * L.n_embd_v * s.cell_count);
        }
    }
    s.size = r.offset();
    if (s.size != size)
        throw std::runtime_error("KV state blob has " + std::to_string(size - s.size) +
                                 " bytes this parser does not know (sliding-window or recurrent cache?)");
}

// Bytes of the blob for `cells` cells with the layout of `s`: header, cell records, K and V.
inline size_t state_size_for(const StateView &s, size_t cells) {
    size_t cell_bytes = s.cell_count ? (s.cells_end - s.cell_offset[0]) / s.cell_count : (s.mrope ? 12 + kCellExtBytes : 12);
    size_t n = 16 + cells * cell_bytes + 8;
    for (const auto &L : s.layers) {
        n += 12 + L.k_row_bytes * cells;
        n += 12 + (s.v_trans ? size_t(L.v_elem_bytes) * L.n_embd_v * cells : L.v_row_bytes * cells);
    }
    return n;
}

}  // namespace edge
