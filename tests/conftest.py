"""Shared fixtures: the tiny random-weight GGUF pair, built once per test session with the real writer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from wallclock import scale

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.session import Session, SessionConfig
from scripts import make_fixtures


def pytest_configure(config: pytest.Config) -> None:
    try:
        scale()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None


@pytest.fixture(scope="session")
def make_fixtures_module() -> ModuleType:
    return make_fixtures


@pytest.fixture(scope="session")
def fixtures(make_fixtures_module: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_fixtures_module.make_fixtures(tmp_path_factory.mktemp("fixtures"), seed=0)


@pytest.fixture
def tiny_model(fixtures: dict[str, Path]) -> Iterator[VisionLanguageModel]:
    model = VisionLanguageModel(ModelConfig(fixtures["model"], fixtures["mmproj"], n_threads=2))
    yield model
    model.close()


@pytest.fixture
def session(tiny_model: VisionLanguageModel) -> Session:
    return Session(tiny_model, SessionConfig(n_ctx=1024, question_room=256, max_answer_tokens=16))
