"""Does the order of importing cv2 and llama.cpp matter on this build? Each order in a fresh process.

On a CUDA build, importing cv2 before llama.cpp's libraries load crashed the tokenizer (std::regex) in a C++
runtime symbol that resolved into libggml-cuda.so; edge_runtime puts libstdc++ in the global scope when it is
imported (edge_runtime/__init__.py). Each case loads SmolLM2 with every layer offloaded and tokenizes a text;
the first case is the control, the crash as it is without edge_runtime. Also records which of llama.cpp's
libraries export C++ runtime symbols (nm -D).

    python -m scripts.cuda_import_order --out results/gpu/import_order.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "cv2, then llama_cpp (no edge_runtime: the control)": "import cv2\nimport llama_cpp",
    "cv2, then edge_runtime": "import cv2\nimport edge_runtime\nimport llama_cpp",
    "edge_runtime.model (llama_cpp, then cv2, as the CLI)": "import edge_runtime.model\nimport llama_cpp",
    "llama_cpp, then cv2": "import llama_cpp\nimport cv2",
}

TOKENIZE = '''
import sys
params = llama_cpp.llama_model_default_params()
params.n_gpu_layers = 999
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), params)
vocab = llama_cpp.llama_model_get_vocab(model)
text = "Hello, world! 123 héllo".encode()
tokens = (llama_cpp.llama_token * 64)()
print(llama_cpp.llama_tokenize(vocab, text, len(text), tokens, 64, True, True))
'''


def model_path() -> str:
    # resolved in this process: a case must not import edge_runtime unless it says so
    from edge_runtime.builtin import resolve_model
    return str(resolve_model("smollm2"))


def run_case(imports: str, model: str, timeout: float = 120) -> dict[str, object]:
    """One order in a fresh interpreter: its exit code (a signal's name if it died of one), tokens, stderr tail."""
    p = subprocess.run([sys.executable, "-c", imports + TOKENIZE, model], capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    rc: int | str = p.returncode
    if p.returncode < 0:
        rc = signal.Signals(-p.returncode).name
    tokens = int(p.stdout.split()[-1]) if p.returncode == 0 and p.stdout.split() else None
    return {"rc": rc, "tokens": tokens, "stderr_tail": p.stderr.strip().splitlines()[-3:]}


def exported_cxx_runtime() -> dict[str, int]:
    """How many std::codecvt symbols each of llama.cpp's libraries exports (libstdc++ should be the only one)."""
    import llama_cpp

    out: dict[str, int] = {}
    nm = shutil.which("nm")
    for lib in sorted((Path(llama_cpp.__file__).parent / "lib").glob("lib*.so")):
        if nm:
            syms = subprocess.run([nm, "-D", "--defined-only", "-C", str(lib)], capture_output=True, text=True).stdout
            out[lib.name] = sum("codecvt" in line for line in syms.splitlines())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu" / "import_order.json")
    args = p.parse_args()
    import llama_cpp

    model = model_path()
    result = {"gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
              "system_info": llama_cpp.llama_print_system_info().decode().strip(),
              "cases": {name: run_case(code, model) for name, code in CASES.items()},
              "codecvt_symbols_exported": exported_cxx_runtime()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["cases"], indent=1))


if __name__ == "__main__":
    main()
