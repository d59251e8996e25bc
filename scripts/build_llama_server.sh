#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (the peer of scripts/bench_llm_peers.py) from the llama.cpp
# sources vendored inside the llama-cpp-python sdist: PyPI is reachable here, GitHub is not.
#
#   bash scripts/build_llama_server.sh            # -> ~/.cache/chatvlm/llama.cpp/build/bin/llama-server
#   LLAMA_DIR=/some/dir bash scripts/build_llama_server.sh
#   JOBS=2 LLAMA_CPP_PYTHON_VERSION=0.3.16 bash ...   # pin the sdist; default: the newest
#
# Run the result with LD_LIBRARY_PATH=<dir>/build/bin (ggml is built as shared libraries).
# Takes ~8 minutes on 2 cores. Idempotent: an existing binary is reused.
set -euo pipefail

LLAMA_DIR=${LLAMA_DIR:-$HOME/.cache/chatvlm/llama.cpp}
JOBS=${JOBS:-2}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
[ -x "$PY" ] || PY=python3
BIN="$LLAMA_DIR/build/bin/llama-server"

if [ -x "$BIN" ]; then
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
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF -DGGML_NATIVE=ON \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$LLAMA_DIR/build" --target llama-server -j"$JOBS" >&2
[ -x "$BIN" ] || { echo "build finished without $BIN" >&2; exit 1; }
echo "$BIN"
