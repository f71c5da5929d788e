#!/usr/bin/env bash
# Builds llama.cpp's tools from the llama-cpp-python sdist's vendor/llama.cpp: the CPU anchor of
# benchmarks/bench_quant.py and of the slow GGUF tests, never a runtime dependency of qwenkit.
#
#   benchmarks/build_llama_cpp.sh [DEST]    (default: ~/.cache/qwenkit/llama.cpp-0.3.36)
#
# About 6 minutes on 2 cores. Leaves DEST/bin/{llama-bench,llama-quantize,llama-perplexity,
# llama-simple,llama-tokenize}, DEST/convert_hf_to_gguf.py and DEST/gguf-py, and prints DEST.
# The converter also wants `sentencepiece` (pip install sentencepiece) in the Python that runs it.
set -euo pipefail
VERSION=0.3.36
DEST=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/qwenkit/llama.cpp-$VERSION}
PYTHON=${PYTHON:-python3}
if [ -x "$DEST/bin/llama-bench" ] && [ -x "$DEST/bin/llama-quantize" ]; then echo "$DEST"; exit 0; fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary :all: \
    "llama-cpp-python==$VERSION" -d "$WORK" >&2
tar xzf "$WORK"/llama_cpp_python-$VERSION.tar.gz -C "$WORK"
SRC="$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$SRC" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF >&2
TOOLS="llama-bench llama-quantize llama-perplexity llama-simple llama-tokenize"
cmake --build "$WORK/build" -j"$(nproc)" --target $TOOLS >&2
mkdir -p "$DEST.tmp/bin"
for t in $TOOLS; do cp "$WORK/build/bin/$t" "$DEST.tmp/bin/"; done
cp "$SRC/convert_hf_to_gguf.py" "$DEST.tmp/"
cp -r "$SRC/gguf-py" "$DEST.tmp/"
[ -d "$SRC/conversion" ] && cp -r "$SRC/conversion" "$DEST.tmp/"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "$DEST"
