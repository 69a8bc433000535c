// KVCapture: the evaluation callback (cb_eval, public API) that finds llama.cpp's own K and V tensors
// during a decode, for the direct (in-place) pass.
//
// llama.cpp names them "cache_k_l<il>" and "cache_v_l<il>" (llama_kv_cache's constructor, no name tag for
// a model's one cache); the graph reaches them through views (get_k/get_v, set_rows), whose view_src is
// always the root tensor. It never asks for a node's data, so the scheduler still runs each split as one
// graph.
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
        if (!ask || self->complete_) return false;  // captured: nothing more to do for the stream's life
        self->look(t);
        for (ggml_tensor *s : t->src)
            if (s) self->look(s);
        return false;
    }

    bool complete() const { return complete_; }
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

    std::vector<ggml_tensor *> k_, v_;
    size_t found_ = 0;
    bool complete_ = false, conflict_ = false;
};

}  // namespace edge
