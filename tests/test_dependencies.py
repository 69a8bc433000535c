"""A missing OpenCV (as on a Termux install without its opencv-python package) is one line, not a traceback.

The child processes run the real entry points with cv2 made unimportable by a sys.meta_path finder that a
sitecustomize.py on PYTHONPATH installs before anything else loads: what Python does when cv2 is not installed.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
from wallclock import wall_s

from edge_runtime.opencv import CV2_MISSING

BLOCK_CV2 = '''
import importlib.abc
import sys


class NoCv2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "cv2" or name.startswith("cv2."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoCv2())
'''


@pytest.fixture(scope="module")
def no_cv2_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("no_cv2")
    (d / "sitecustomize.py").write_text(BLOCK_CV2)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), *filter(None, [os.environ.get("PYTHONPATH")])])}


def run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=wall_s(120))


def test_the_blocker_really_hides_cv2(no_cv2_env: dict[str, str]) -> None:
    r = run([sys.executable, "-c", "import cv2"], no_cv2_env)
    assert r.returncode == 1 and "ModuleNotFoundError: No module named 'cv2'" in r.stderr
    assert run([sys.executable, "-c", "import cv2"], dict(os.environ)).returncode == 0  # and only the blocker does


@pytest.mark.parametrize("entry", ["python -m edge_runtime", "edge-runtime"])
def test_the_command_says_in_one_line_that_opencv_is_missing(no_cv2_env: dict[str, str], entry: str) -> None:
    if entry == "edge-runtime":
        script = Path(sys.executable).parent / "edge-runtime"
        if not script.exists():
            pytest.skip(f"no installed console script beside {sys.executable}")
        cmd = [str(script)]
    else:
        cmd = [sys.executable, "-m", "edge_runtime"]
    r = run([*cmd, "--demo"], no_cv2_env)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [f"edge-runtime: error: {CV2_MISSING}"], r.stderr
    assert r.stdout == ""


def test_the_library_raises_an_import_error_that_says_what_to_install(no_cv2_env: dict[str, str]) -> None:
    code = ("from edge_runtime.errors import MissingDependency\n"
            "try:\n    import edge_runtime.session\n"
            "except MissingDependency as e:\n    print(isinstance(e, ImportError), e)\n")
    r = run([sys.executable, "-c", code], no_cv2_env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"True {CV2_MISSING}"]


def test_only_edge_runtime_opencv_imports_cv2() -> None:
    """The one place that knows how to say OpenCV is missing is the one place that imports it."""
    package = Path(__file__).resolve().parents[1] / "edge_runtime"
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            # cli.py's lazy import (--verbose) runs after session.py has loaded cv2 through edge_runtime.opencv
            if any(n == "cv2" or n.startswith("cv2.") for n in names):
                assert path.name == "opencv.py" or (path.name == "cli.py" and node.col_offset > 0), (path, node.lineno)
