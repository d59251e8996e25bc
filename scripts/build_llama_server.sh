#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the peer of scripts/bench_llm_peers.py) from the llama.cpp
# sources vendored inside the llama-cpp-python sdist: PyPI is reachable here, GitHub is not.
#
#   bash scripts/build_llama_server.sh            # -> ~/.cache/chatvlm/llama.cpp/build/bin/llama-server
#   LLAMA_DIR=/some/dir bash scripts/build_llama_server.sh
#   JOBS=2 LLAMA_CPP_PYTHON_VERSION=0.3.16 bash ...   # pin the sdist; default: the newest
#
# Run the result with LD_LIBRARY_PATH=<dir>/build/bin (ggml is built as shared libraries).
# Takes ~8 minutes on 2 cores. Idempotent: an existing binary is reused (REBUILD=1 rebuilds).
set -euo pipefail

LLAMA_DIR=${LLAMA_DIR:-$HOME/.cache/chatvlm/llama.cpp}
JOBS=${JOBS:-2}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python3
BIN="$LLAMA_DIR/build/bin/llama-server"

# CPU features: -march=native, except AMX. Some VMs list amx_* in /proc/cpuinfo but fault on
# the first AMX instruction (SIGILL in ggml's AMX matmul, seen here), so build without it
# unless LLAMA_AMX=1. Extra cmake flags: LLAMA_CMAKE_ARGS.
cpu_args=(-DGGML_NATIVE=ON)
if [ "${LLAMA_AMX:-0}" != 1 ] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
  cpu_args=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
  for f in avx512f:GGML_AVX512 avx512_vbmi:GGML_AVX512_VBMI avx512_vnni:GGML_AVX512_VNNI avx512_bf16:GGML_AVX512_BF16; do
    grep -qw "${f%%:*}" /proc/cpuinfo && cpu_args+=("-D${f#*:}=ON")
  done
fi

if [ -x "$BIN" ] && [ -z "${REBUILD:-}" ]; then
  echo "$BIN"
  exit 0
fi
if [ -f "$LLAMA_DIR/src/CMakeLists.txt" ]; then  # sources already here: reconfigure and rebuild
  cmake -S "$LLAMA_DIR/src" -B "$LLAMA_DIR/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "${cpu_args[@]}" ${LLAMA_CMAKE_ARGS:-} >&2
  cmake --build "$LLAMA_DIR/build" --target llama-server -j"$JOBS" >&2
  echo "$BIN"
  exit 0
fi
command -v cmake >/dev/null || { echo "cmake is missing: apt-get install cmake" >&2; exit 1; }
command -v c++ >/dev/null || { echo "a C++ compiler is missing: apt-get install g++" >&2; exit 1; }

mkdir -p "$LLAMA_DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

spec=llama-cpp-python
[ -n "${LLAMA_CPP_PYTHON_VERSION:-}" ] && spec="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
# --no-binary for this package only: its build tools may come as wheels (metadata prep).
"$PY" -m pip download --no-deps --no-binary llama-cpp-python -d "$work" "$spec" >&2
sdist=$(ls "$work"/llama_cpp_python-*.tar.gz | head -1)
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp | head -1)
[ -f "$src/CMakeLists.txt" ] || { echo "no llama.cpp sources in $sdist" >&2; exit 1; }

# Keep the sources next to the build so a rebuild (or a look at the code) needs no download.
rm -rf "$LLAMA_DIR/src"
cp -a "$src" "$LLAMA_DIR/src"
cmake -S "$LLAMA_DIR/src" -B "$LLAMA_DIR/build" -DCMAKE_BUILD_TYPE=Release \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  "${cpu_args[@]}" ${LLAMA_CMAKE_ARGS:-} >&2
cmake --build "$LLAMA_DIR/build" --target llama-server -j"$JOBS" >&2
[ -x "$BIN" ] || { echo "build finished without $BIN" >&2; exit 1; }
echo "$BIN"
