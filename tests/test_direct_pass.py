"""The in-place compression pass on llama.cpp's own KV tensors against the portable (copy) pass.

Two models on the same GGUF files get the same frames and questions; one session rewrites the cache in
place (found through cb_eval), the other through llama_state_seq_get_data / set_data. Their sequence
states must stay byte-identical. Layouts the in-place pass cannot trust must send it back to the copy.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from test_compression import N_CTX, open_model, variants  # noqa: F401 - variants is a fixture

from edge_runtime import _native_testing
from edge_runtime.context import Context
from edge_runtime.model import ModelError, VisionLanguageModel
from edge_runtime.policies import make_policy
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import SyntheticSource

CASES = [  # model, projector, flash attention (off: transposed V), cache type, policy
    ("llama-2x2", "mmproj-4x4", "on", "f16", "infinipot-v"),
    ("llama-2x2", "mmproj-4x4", "off", "f16", "infinipot-v"),
    ("llama-1x1", "mmproj-2x2", "off", "f32", "infinipot-v"),
    ("llama-3x4", "mmproj-6x6", "on", "f32", "infinipot-v"),
    ("llama-1x2", "mmproj-6x6", "off", "f16", "van"),
    ("llama-3x4", "mmproj-2x2", "on", "f16", "tar"),
    ("llama-2x2", "mmproj-4x4", "off", "f16", "random"),  # chosen in Python: apply() moves the cells
    ("llama-3x4", "mmproj-4x4", "on", "f16", "sliding-window"),
]


def open_host_model(variants: dict[str, Path], model: str, mmproj: str, **kw: object) -> VisionLanguageModel:  # noqa: F811
    """The in-place pass works on caches the CPU reads: on a GPU build these tests keep the model on the CPU
    (use_gpu=False, the CLI's --cpu), so they pin the same pass everywhere."""
    return open_model(variants, model, mmproj, use_gpu=False, **kw)


def tokens_per_frame(model: VisionLanguageModel) -> int:
    probe = model.encode_frame(np.zeros((8, 8, 3), np.uint8))
    model.free_frame(probe)
    return probe.n_tokens


def make_session(model: VisionLanguageModel, policy: str, direct: bool, p: int, graph_on_cpu: bool = False) -> Session:
    config = SessionConfig(n_ctx=N_CTX, budget=16 * p, question_room=128, max_answer_tokens=4, direct_pass=direct,
                           graph_on_cpu=graph_on_cpu)
    return Session(model, config, make_policy(policy, pool=policy == "infinipot-v"))


@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_direct_and_portable_passes_leave_byte_identical_states(case: tuple, variants: dict[str, Path]) -> None:  # noqa: F811
    model_name, mmproj, flash_attn, cache_type, policy = case
    kw = {"flash_attn": flash_attn, "cache_type": cache_type}
    with open_host_model(variants, model_name, mmproj, **kw) as m_direct, open_host_model(variants, model_name, mmproj,
                                                                                  **kw) as m_copy:
        p = tokens_per_frame(m_direct)
        direct, copy = make_session(m_direct, policy, True, p), make_session(m_copy, policy, False, p)
        paths = []
        for i, frame in enumerate(SyntheticSource(seed=11, n_frames=16 + 4 * 5)):  # five passes
            passes = direct.memory.passes
            direct.insert_frame(frame)
            copy.insert_frame(frame)
            if direct.memory.passes != passes:
                paths.append((direct.compressor.last.path, copy.compressor.last.path))
            if i % 7 == 6:  # questions in between: decoded on top, then removed again
                assert direct.ask("What moved?").text == copy.ask("What moved?").text
            assert direct.context.state_bytes() == copy.context.state_bytes(), f"states differ after frame {i}"
        assert paths == [("direct", "portable")] * 5
        assert direct.memory.next_pos == copy.memory.next_pos == direct.memory.prefix_tokens + 16 * p


@pytest.mark.parametrize("cache_type", ["f16", "f32"])
def test_the_evaluation_callback_finds_every_layers_k_and_v(variants: dict[str, Path], cache_type: str) -> None:  # noqa: F811
    with open_host_model(variants, "llama-3x4", "mmproj-4x4", cache_type=cache_type) as model:
        with Context(model, N_CTX) as fresh:
            # the probe decode showed every layer, then the callback was taken back and the cache emptied
            assert fresh.kv_capture.complete and fresh.kv_capture.detached
            assert fresh.max_position() == -1
        session = Session(model, SessionConfig(n_ctx=N_CTX, budget=256, question_room=128), make_policy("infinipot-v"))
        capture = session.context.kv_capture
        calls = capture.calls
        session.insert_frame(next(iter(SyntheticSource(seed=3, n_frames=1))))
        assert capture.calls == calls  # no decode after the probe calls it: llama.cpp's scheduler has no callback
        geo = session.geometry
        found = capture.describe()
        assert [f["layer"] for f in found] == list(range(geo.n_layer))
        for f in found:
            for kind, dim in (("k", geo.head_dim_k), ("v", geo.head_dim_v)):
                t = f[kind]
                assert t["name"] == f"cache_{kind}_l{f['layer']}"  # src/llama-kv-cache.cpp names them so
                assert t["type"] == cache_type and t["host"]
                assert t["ne"][0] == geo.n_head_kv * dim and t["ne"][1] >= session.context.n_ctx
                assert t["ne"][2:] == [1, 1]
        assert session.compressor.native.in_place_refusal() == ""


def stream_until_pass(session: Session, frames: object) -> None:
    """Insert frames until the next one would start a compression pass."""
    mem = session.memory
    while mem.video_tokens + mem.tokens_per_frame <= mem.budget or not mem.records:
        session.insert_frame(next(frames))


@pytest.mark.parametrize("flash_attn", ["on", "off"])
@pytest.mark.parametrize("broken", ["reverse-before-first-pass", "reverse-later", "shift"])
def test_a_layout_the_direct_pass_cannot_trust_falls_back_to_the_copy(variants: dict[str, Path], broken: str,  # noqa: F811
                                                                      flash_attn: str,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Video cells in reverse cell order (same positions, so the same memory to the model), or positions
    shifted as keep mode would have them: the in-place pass must notice and copy instead, and the result
    must still be what the copy alone gives."""
    with open_host_model(variants, "llama-2x2", "mmproj-4x4", flash_attn=flash_attn) as m_direct, \
            open_host_model(variants, "llama-2x2", "mmproj-4x4", flash_attn=flash_attn) as m_copy:
        p = tokens_per_frame(m_direct)
        direct, copy = make_session(m_direct, "infinipot-v", True, p), make_session(m_copy, "infinipot-v", False, p)
        frames_d, frames_c = iter(SyntheticSource(seed=12, n_frames=60)), iter(SyntheticSource(seed=12, n_frames=60))
        if broken != "reverse-before-first-pass":  # one pass in place first: the layout is trusted from then on
            for s, f in ((direct, frames_d), (copy, frames_c)):
                stream_until_pass(s, f)
                s.insert_frame(next(f))
            assert direct.compressor.last.path == "direct"
        for s, f in ((direct, frames_d), (copy, frames_c)):
            stream_until_pass(s, f)
        reverse, shift = broken.startswith("reverse"), 7 if broken == "shift" else 0
        _native_testing.relayout(direct.compressor.native, reverse, shift)
        with caplog.at_level(logging.WARNING, logger="edge_runtime.compressor"):
            direct.insert_frame(next(frames_d))
        copy.insert_frame(next(frames_c))
        assert direct.compressor.last.path == "portable"
        assert "not laid out as the in-place pass expects" in caplog.text
        assert direct.context.state_bytes() == copy.context.state_bytes()
        for s, f in ((direct, frames_d), (copy, frames_c)):  # the copy re-packed the cells: in place again
            stream_until_pass(s, f)
            s.insert_frame(next(f))
        assert direct.compressor.last.path == "direct"
        assert direct.context.state_bytes() == copy.context.state_bytes()


def test_a_hole_in_the_cells_is_refused_without_touching_the_memory(variants: dict[str, Path]) -> None:  # noqa: F811
    with open_host_model(variants, "llama-2x2", "mmproj-4x4") as model:
        p = tokens_per_frame(model)
        session = make_session(model, "infinipot-v", True, p)
        frames = iter(SyntheticSource(seed=13, n_frames=40))
        stream_until_pass(session, frames)
        session.insert_frame(next(frames))  # one pass in place
        stream_until_pass(session, frames)
        hole = session.memory.prefix_tokens + 3
        session.context.remove_positions(hole, hole + 1)  # behind the session's back: one cell fewer than recorded
        state = session.context.state_bytes()
        with pytest.raises(ModelError, match="video cells but .* were recorded"):
            session.insert_frame(next(frames))
        assert session.context.state_bytes() == state
