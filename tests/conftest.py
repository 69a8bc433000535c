"""Shared fixtures: the tiny random-weight GGUF pair, built once per test session with the real writer."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from edge_runtime.model import ModelConfig, VisionLanguageModel
from edge_runtime.session import Session, SessionConfig

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py: scripts/ is not a package, and tests must run exactly what users run."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def make_fixtures_module() -> ModuleType:
    return load_script("make_fixtures")


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
