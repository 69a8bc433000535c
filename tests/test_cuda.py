"""What only a GPU build of llama.cpp can show (skipped on a CPU-only build, as in CI): scripts/cuda_suite.sh runs
the suite on one."""

from __future__ import annotations

import llama_cpp
import pytest

from scripts.cuda_import_order import CASES, model_path, run_case

pytestmark = pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(),
                                reason="llama.cpp here has no GPU backend (a CUDA build runs these)")


@pytest.mark.parametrize("case", [name for name in CASES if "control" not in name])
def test_importing_cv2_in_any_order_leaves_the_tokenizer_working(case: str) -> None:
    # cv2 first once crashed the tokenizer's std::regex on CUDA builds (edge_runtime/__init__.py says why)
    result = run_case(CASES[case], model_path())
    assert result["rc"] == 0 and result["tokens"] and result["tokens"] > 0, result
