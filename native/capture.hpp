// KVCapture: the evaluation callback (cb_eval, public API) that finds llama.cpp's own K and V tensors
// during a decode, for the direct (in-place) pass.
//
// llama.cpp names them "cache_k_l<il>" and "cache_v_l<il>" (llama_kv_cache's constructor, no name tag for
// a model's one cache); the graph reaches them through views (get_k/get_v, set_rows), whose view_src is
// always the root tensor. It never asks for a node's data, so the scheduler still runs each split as one
// graph.
//
// A callback costs every decode even when it asks for nothing: the scheduler then computes each split as a
// graph view and synchronizes after it (ggml/src/ggml-backend.cpp:1814-1850), which on CUDA took +33 % per
// frame. The tensors are llama.cpp's for the context's life (allocated once in llama_kv_cache's constructor),
// so once one decode has shown them the callback is taken back: detach() clears it in the context's cparams,
// which llama.cpp copies into the scheduler each time it builds a graph (src/llama-context.cpp:1428). There is
// no public call for that; the pair is found by value (the callback and this object, side by side as
// llama_cparams' cb_eval and cb_eval_user_data, src/llama-cparams.h:64-65, at byte 160 of llama_context in the
// pinned version, whose first 1040 bytes are the object). Found anything but once, nothing is written and the
// callback stays: slower, never wrong.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"

namespace edge {

namespace py = pybind11;

class KVCapture {
  public:
    explicit KVCapture(int n_layer) : k_(size_t(std::max(n_layer, 0)), nullptr), v_(k_.size(), nullptr) {}

    static bool on_eval(ggml_tensor *t, bool ask, void *user_data) {
        auto *self = static_cast<KVCapture *>(user_data);
        ++self->calls_;
        if (!ask || self->complete_) return false;  // captured: nothing more to do for the stream's life
        self->look(t);
        for (ggml_tensor *s : t->src)
            if (s) self->look(s);
        return false;
    }

    // Take the callback back from the context (see the top of the file). The caller then makes llama.cpp
    // build a new graph (a decode of another shape), which hands the scheduler the cleared callback.
    bool detach(uintptr_t ctx) {
        if (detached_ || !ctx) return detached_;
        auto *words = reinterpret_cast<uintptr_t *>(ctx);
        const uintptr_t cb = callback(), ud = user_data();
        size_t hits = 0, at = 0;
        for (size_t i = 0; i + 1 < kScanWords; ++i)
            if (words[i] == cb && words[i + 1] == ud) ++hits, at = i;
        if (hits != 1) return false;
        words[at] = words[at + 1] = 0;
        detached_ = true;
        return true;
    }

    bool complete() const { return complete_; }
    bool detached() const { return detached_; }
    uint64_t calls() const { return calls_; }
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

    // The words of llama_context searched for the pair: past llama_cparams (it ends at byte 184 in the pinned
    // version), within the object (1040 bytes).
    static constexpr size_t kScanWords = 64;

    std::vector<ggml_tensor *> k_, v_;
    size_t found_ = 0;
    uint64_t calls_ = 0;
    bool complete_ = false, conflict_ = false, detached_ = false;
};

}  // namespace edge
