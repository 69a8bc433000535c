// The edge_runtime._native module: the pass (KVPass), its parameters, the capture (KVCapture) and the
// state and slot-table helpers, as Python sees them. The test-only hooks live in testing.cpp
// (edge_runtime._native_testing).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>

#include "capture.hpp"
#include "kv_pass.hpp"
#include "kv_state.hpp"
#include "llama.h"

namespace py = pybind11;
using namespace edge;

PYBIND11_MODULE(_native, m) {
    m.doc() = "edge-runtime's KV compression pass over llama.cpp's KV cache (InfiniPot-V).";
    m.def("state_layout", [](uintptr_t ctx, bool mrope) {
        const edge::StateLayout s = edge::layout_of(llama_get_model(reinterpret_cast<llama_context *>(ctx)), mrope);
        py::dict d;
        d["n_caches"] = s.n_caches;
        d["recurrent"] = s.recurrent;
        return d;
    }, py::arg("ctx"), py::arg("mrope"), "Which parts a context's sequence state has: KV caches, a recurrent state.");
    m.def("state_parts", &state_parts, py::arg("ctx"), py::arg("mrope"), py::arg("rows") = false,
          py::arg("seq_id") = 0,
          "A sequence's KV state of a context, part by part (caches in blob order, then any recurrent state).");
    m.def("keep_slots", &keep_slots, py::arg("frame"), py::arg("patch"), py::arg("rot_pos"), py::arg("n"),
          py::arg("kept"), py::arg("new_rot_pos") = py::none(),
          "Slot j of each (layer, head) becomes its old slot kept[l, h, j], in the [L, H, M] tables, in place; "
          "returns the frame ids still held, ascending.");
    py::class_<KVCapture>(m, "KVCapture")
        .def(py::init<int>(), py::arg("n_layer"))
        .def_property_readonly("callback", &KVCapture::callback)
        .def_property_readonly("user_data", &KVCapture::user_data)
        .def_property_readonly("complete", &KVCapture::complete)
        .def_property_readonly("detached", &KVCapture::detached)
        .def_property_readonly("calls", &KVCapture::calls)
        .def("detach", &KVCapture::detach, py::arg("ctx"))
        .def("describe", &KVCapture::describe);
    py::class_<PassParams>(m, "PassParams", "What a pass needs to know of the model and the memory (fixed for its life).")
        .def(py::init<>())
        .def_readwrite("seq_id", &PassParams::seq_id)
        .def_readwrite("n_prefix", &PassParams::n_prefix)
        .def_readwrite("n_head_kv", &PassParams::n_head_kv)
        .def_readwrite("head_dim_k", &PassParams::head_dim_k)
        .def_readwrite("head_dim_v", &PassParams::head_dim_v)
        .def_readwrite("rope_type", &PassParams::rope_type)
        .def_readwrite("n_rot", &PassParams::n_rot)
        .def_readwrite("freq_base", &PassParams::freq_base)
        .def_readwrite("freq_scale", &PassParams::freq_scale)
        .def_readwrite("rope_sections", &PassParams::rope_sections)
        .def_readwrite("mrope", &PassParams::mrope)
        .def_readwrite("sliding_freq_base", &PassParams::sliding_freq_base)
        .def_readwrite("max_cells", &PassParams::max_cells)
        .def_readwrite("max_position", &PassParams::max_position)
        .def_readwrite("n_threads", &PassParams::n_threads)
        .def_readwrite("in_place", &PassParams::in_place)
        .def_readwrite("graph_on_cpu", &PassParams::graph_on_cpu);
    py::class_<ScoreParams>(m, "ScoreParams", "InfiniPot-V's selection settings for one pass.")
        .def(py::init<>())
        .def_readwrite("nx", &ScoreParams::nx)
        .def_readwrite("ny", &ScoreParams::ny)
        .def_readwrite("recent_min_frame", &ScoreParams::recent_min_frame)
        .def_readwrite("keep", &ScoreParams::keep)
        .def_readwrite("alpha", &ScoreParams::alpha)
        .def_readwrite("pool", &ScoreParams::pool)
        .def_readwrite("use_tar", &ScoreParams::use_tar)
        .def_readwrite("use_van", &ScoreParams::use_van)
        .def_readwrite("shared", &ScoreParams::shared);
    py::class_<KVPass>(m, "KVPass")
        // The pass keeps a pointer to the capture: keep the capture alive while the pass lives.
        .def(py::init<uintptr_t, const PassParams &, KVCapture *>(), py::arg("ctx"), py::arg("params"),
             py::arg("capture") = nullptr, py::keep_alive<1, 4>())
        .def("compress", &KVPass::compress, py::arg("frame"), py::arg("patch"), py::arg("rot_pos"), py::arg("n_video"),
             py::arg("choice"), py::arg("reindex"), py::arg("next_pos"), py::arg("new_pos") = py::none(),
             py::arg("on_read") = py::none())
        .def("in_place_refusal", &KVPass::in_place_refusal)
        // Diagnostics: a copy of the state, in slot order (tests, scripts/retention.py).
        .def("read", &KVPass::read, py::call_guard<py::gil_scoped_release>())
        .def("record_scores", &KVPass::record_scores, py::arg("on"))
        .def("scores", &KVPass::scores)
        .def_property_readonly("path", &KVPass::path)
        .def_property_readonly("backend", &KVPass::backend)
        .def_property_readonly("device_bytes", &KVPass::device_bytes)
        .def_property_readonly("graph_host_bytes", &KVPass::graph_host_bytes)
        .def_property_readonly("graph_builds", &KVPass::graph_builds)
        .def("copy_ms", &KVPass::copy_ms, py::arg("n_bytes"), py::arg("repeats") = 5)
        .def_property_readonly("n_slots", &KVPass::n_slots)
        .def_property_readonly("n_layer", &KVPass::n_layer)
        .def_property_readonly("v_trans", &KVPass::v_trans)
        .def_property_readonly("state_bytes", &KVPass::state_bytes)
        .def_property_readonly("buffer_bytes", &KVPass::buffer_bytes)
        .def("slot_positions", &KVPass::slot_positions)
        .def("slot_ext", &KVPass::slot_ext)
        .def("keys", &KVPass::keys)
        .def("values", &KVPass::values);
}
