"""The streaming session on the real llama.cpp: frames become records, questions leave no trace."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from probes import probe_logits

from edge_runtime.model import ModelConfig, ModelError, VisionLanguageModel
from edge_runtime.policies import MemoryFull, SettingsError
from edge_runtime.session import Session, SessionConfig
from edge_runtime.sources import Frame, SyntheticSource

TOKENS_PER_FRAME = 16  # the tiny mmproj: 64 px frames, 16 px patches


def stream(session: Session, n: int, seed: int = 0) -> None:
    for frame in SyntheticSource(seed=seed, n_frames=n):
        session.insert_frame(frame)


def test_opening_uses_the_models_chat_template(session: Session) -> None:
    opening = session.opening_text
    assert opening.startswith("<|im_start|>system\n" + session.config.system_prompt)
    assert opening.endswith("<|im_start|>user\n")
    assert session.context.max_position() == session.memory.prefix_tokens - 1


def test_frames_are_recorded_with_positions_and_grid(session: Session) -> None:
    stream(session, 5)
    mem = session.memory
    assert [r.index for r in mem.records] == [0, 1, 2, 3, 4]
    assert [r.timestamp for r in mem.records] == [0.0, 1.0, 2.0, 3.0, 4.0]
    for k, r in enumerate(mem.records):
        assert r.pos0 == mem.prefix_tokens + k * TOKENS_PER_FRAME
        assert r.n_tokens == r.n_pos == TOKENS_PER_FRAME
        # mtmd reports (16, 1); LLaVA's mlp tokens are a 4 x 4 grid row by row, which --pool needs
        assert (r.nx, r.ny) == (4, 4) and r.nx * r.ny == TOKENS_PER_FRAME
    assert mem.video_tokens == 5 * TOKENS_PER_FRAME
    assert mem.next_pos == mem.prefix_tokens + 5 * TOKENS_PER_FRAME
    assert session.context.max_position() == mem.next_pos - 1


def test_any_frame_size_gives_the_same_tokens(session: Session) -> None:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(480, 640), (31, 17), (1080, 1920)]):
        image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        record, timing = session.insert_frame(Frame(index=i, timestamp=float(i), image=image))
        assert record.n_tokens == TOKENS_PER_FRAME
        assert timing.encode_ms > 0 and timing.decode_ms > 0


def test_ask_leaves_the_cache_bit_identical(session: Session) -> None:
    stream(session, 6)
    context = session.context
    state_before = context.state_bytes()
    logits_before = probe_logits(context, session.memory.next_pos)
    answer = session.ask("What colour was the circle?")
    assert answer.n_tokens > 0 and answer.ttft_ms > 0
    assert context.state_bytes() == state_before
    assert np.array_equal(probe_logits(context, session.memory.next_pos), logits_before)
    # and the memory keeps growing where it left off
    stream(session, 1, seed=1)
    assert session.memory.records[-1].pos0 == session.memory.prefix_tokens + 6 * TOKENS_PER_FRAME


def test_answers_stream_piece_by_piece(session: Session) -> None:
    stream(session, 2)
    pieces: list[str] = []
    answer = session.ask("Describe the scene.", on_token=pieces.append)
    assert "".join(pieces).strip() == answer.text


def test_same_memory_same_question_same_answer(session: Session) -> None:
    stream(session, 3)
    first = session.ask("What is there?", max_tokens=12)
    session.history.clear()
    second = session.ask("What is there?", max_tokens=12)
    assert first.text == second.text and first.n_tokens == second.n_tokens


def test_history_is_given_back_within_its_budget(tiny_model: VisionLanguageModel) -> None:
    session = Session(tiny_model, SessionConfig(n_ctx=1024, question_room=256, max_answer_tokens=4, history_tokens=40))
    stream(session, 1)
    session.history = [("first question about the red square", "it moved left"),
                       ("second question about the blue circle", "it stayed")]
    prompt = session.question_prompt("third question")
    assert "second question about the blue circle" in prompt and "it stayed" in prompt
    assert "first question" not in prompt  # the oldest turn did not fit in 40 tokens
    assert prompt.rstrip().endswith("<|im_start|>assistant")
    assert prompt.index("second question") < prompt.index("third question")


def test_history_off_gives_only_the_question(tiny_model: VisionLanguageModel) -> None:
    session = Session(tiny_model, SessionConfig(n_ctx=1024, question_room=256, history_tokens=0))
    session.history = [("old question", "old answer")]
    prompt = session.question_prompt("new question")
    assert "old" not in prompt and "new question" in prompt


def test_full_memory_stops_cleanly_and_stays_queryable(fixtures: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"], n_threads=2)) as model:
        session = Session(model, SessionConfig(n_ctx=256, question_room=64, max_answer_tokens=8))
        fits = session.memory.capacity // TOKENS_PER_FRAME
        with pytest.raises(MemoryFull, match="video memory full after .* frames.*--ctx"):
            stream(session, fits + 3)
        assert len(session.memory.records) == fits
        state = session.context.state_bytes()
        assert session.ask("What happened?").n_tokens > 0
        assert session.context.state_bytes() == state


def test_question_too_long_for_the_room_is_refused(session: Session) -> None:
    stream(session, session.memory.capacity // TOKENS_PER_FRAME)  # only the question room is left
    with pytest.raises(ModelError, match="raise --question-room"):
        session.ask("why " * 300)
    assert session.context.max_position() == session.memory.next_pos - 1


def test_context_too_small_for_any_video(fixtures: dict[str, Path]) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"])) as model:
        with pytest.raises(ModelError, match="leaves no room for video"):
            Session(model, SessionConfig(n_ctx=256, question_room=256))
        session = Session(model, SessionConfig(n_ctx=256, question_room=256 - 40))  # 7 cells for video
        with pytest.raises(SettingsError, match="one frame needs 16 tokens but the video memory holds 7"):
            stream(session, 1)


@pytest.mark.parametrize("flash_attn", ["on", "off"])
def test_both_kv_layouts_stream_and_answer(fixtures: dict[str, Path], flash_attn: str) -> None:
    with VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"], flash_attn=flash_attn)) as model:
        session = Session(model, SessionConfig(n_ctx=512, question_room=128, max_answer_tokens=4))
        stream(session, 3)
        state = session.context.state_bytes()
        session.ask("What is there?")
        assert session.context.state_bytes() == state
