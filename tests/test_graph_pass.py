"""The graph route of the in-place pass (native/graph_pass.cpp: ggml graphs on the backend that owns the KV
tensors, what a GPU cache takes) against the CPU kernels, both run here on the CPU backend; on a GPU build, the
graph route on the device against the reference (the last test).

The two routes score with the same formulas on the same bytes and the selection is the same native code, so
they must keep the same slots in every pass; the re-rotated keys differ only by the rounding of ggml's RoPE
against the pass's tables (and the values of later frames by that rounding carried through attention).
"""

from __future__ import annotations

import logging
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from test_compression import N_CTX, CheckedInfiniPotV, open_model, variants  # noqa: F401 - variants is a fixture
from test_direct_pass import make_session, open_host_model, tokens_per_frame

from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

CASES = [  # model, projector, flash attention (off: transposed V), cache type, policy
    ("llama-2x2", "mmproj-4x4", "on", "f16", "infinipot-v"),
    ("llama-2x2", "mmproj-4x4", "off", "f16", "infinipot-v"),
    ("llama-1x1", "mmproj-2x2", "off", "f32", "infinipot-v"),
    ("llama-3x4", "mmproj-6x6", "on", "f32", "infinipot-v"),
    ("llama-1x2", "mmproj-6x6", "off", "f16", "van"),
    ("llama-3x4", "mmproj-2x2", "on", "f16", "tar"),
    ("llama-2x2", "mmproj-4x4", "off", "f16", "random"),  # chosen in Python: only the move graph runs
]


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_the_graph_route_keeps_what_the_cpu_kernels_keep(case: tuple, variants: dict[str, Path]) -> None:  # noqa: F811
    model_name, mmproj, flash_attn, cache_type, policy = case
    kw = {"flash_attn": flash_attn, "cache_type": cache_type}
    with open_host_model(variants, model_name, mmproj, **kw) as m_cpu, \
            open_host_model(variants, model_name, mmproj, **kw) as m_graph:
        p = tokens_per_frame(m_cpu)
        cpu = make_session(m_cpu, policy, True, p)
        graph = make_session(m_graph, policy, True, p, graph_on_cpu=True)
        kept: dict[str, list[np.ndarray]] = {"cpu": [], "graph": []}
        for name, s in (("cpu", cpu), ("graph", graph)):
            s.compressor.on_pass.append(lambda kv, memory, result, name=name: kept[name].append(result["kept"]))
        for i, frame in enumerate(SyntheticSource(seed=11, n_frames=16 + 4 * 5)):  # five passes
            cpu.insert_frame(frame)
            graph.insert_frame(frame)
            if i % 7 == 6:
                assert cpu.ask("What moved?").text == graph.ask("What moved?").text
        assert graph.compressor.native.in_place_refusal() == ""
        assert len(kept["graph"]) == 5 and graph.compressor.last.path == "graph"
        assert graph.compressor.last.backend == "CPU" and cpu.compressor.last.path == "direct"
        # the probe's two graphs per V layout, then each graph again only when a pass's shape changes
        assert graph.compressor.native.graph_builds < 4 + 2 * 5, graph.compressor.native.graph_builds
        # its host memory is O(slots): inputs and scores, a fraction of the KV bytes even at head_dim 16
        assert 0 < graph.compressor.native.graph_host_bytes < graph.compressor.last.state_bytes / 2
        for a, b in zip(kept["cpu"], kept["graph"], strict=True):
            np.testing.assert_array_equal(a, b)
        assert graph.memory.next_pos == cpu.memory.next_pos
        for layer in range(cpu.geometry.n_layer):
            kc, kg = cpu.compressor.native.keys(layer), graph.compressor.native.keys(layer)
            # re-rotated keys: ggml's RoPE (float angles) against the pass's tables (double angles)
            np.testing.assert_allclose(kg, kc, rtol=0, atol=2e-2 * float(np.abs(kc).max()))
            # values move as bytes; those of frames decoded after a pass carry the keys' rounding through attention
            vc, vg = cpu.compressor.native.values(layer), graph.compressor.native.values(layer)
            np.testing.assert_allclose(vg, vc, rtol=0, atol=1e-2 * float(np.abs(vc).max()))


GPU_CASES = [("llama-3x4", "mmproj-6x6", "on"), ("llama-2x2", "mmproj-4x4", "off")]


@pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(), reason="needs a GPU build of llama.cpp")
@pytest.mark.parametrize("case", GPU_CASES, ids=["-".join(c) for c in GPU_CASES])
def test_on_a_gpu_the_graph_route_chooses_as_the_reference_does(case: tuple, variants: dict[str, Path]) -> None:  # noqa: F811
    """The cache on the GPU: the graph route (in place, on the device) checked pass by pass against the NumPy
    reference on its own cache (CheckedInfiniPotV: the choice from its scores exactly the reference's, the
    scores within gpu_tar_atol), beside the portable pass (the state copied to the host, scored by the CPU
    kernels), which must match the reference exactly. The two caches start alike, but once a near tie falls
    the other way they hold different tokens: their kept sets are compared by overlap, in the first pass."""
    model_name, mmproj, flash_attn = case
    with open_model(variants, model_name, mmproj, flash_attn=flash_attn) as m_graph, \
            open_model(variants, model_name, mmproj, flash_attn=flash_attn) as m_copy:
        p = tokens_per_frame(m_graph)
        sessions, checked = {}, {}
        for name, model, direct in (("graph", m_graph, True), ("copy", m_copy, False)):
            checked[name] = CheckedInfiniPotV(pool=True)
            sessions[name] = Session(model, SessionConfig(n_ctx=N_CTX, budget=16 * p, question_room=128,
                                                          max_answer_tokens=4, direct_pass=direct), checked[name])
            checked[name].attach(sessions[name])
        graph, copy = sessions["graph"], sessions["copy"]
        for frame in SyntheticSource(seed=11, n_frames=16 + 4 * 5):
            graph.insert_frame(frame)
            copy.insert_frame(frame)
        assert graph.compressor.last.path == "graph" and graph.compressor.last.backend.startswith("CUDA")
        assert graph.compressor.native.buffer_bytes == 0  # no host copy of the state, ever
        assert graph.compressor.native.graph_builds < 4 + 2 * 5  # kept while the shape stays: CUDA graphs replay
        assert copy.compressor.last.path == "portable"
        assert len(checked["graph"].seen) == len(checked["copy"].seen) == 5
        first_g, first_c = checked["graph"].seen[0]["kept"], checked["copy"].seen[0]["kept"]
        overlap = np.mean([np.isin(first_g[i], first_c[i]).mean() for i in np.ndindex(first_g.shape[:2])])
        logging.getLogger(__name__).info("first pass: %.4f of the graph route's kept slots are the copy's", overlap)
        assert overlap >= 0.95, overlap
        for session in (graph, copy):  # the memory the passes left answers (a tiny random model may stop at once)
            answer = session.ask("What moved?")
            assert answer.video_tokens == session.status().video_tokens > 0
            assert np.isfinite(session.context.logits()).all()
