#!/usr/bin/env bash
# Stage the FlashInfer wheel for the lent GPU machine in build/devwhl/ (5.5 MB): all that the GPU tests and the engine
# benchmarks (gpu_streams, profile_llm, gpu_parity --llm dummy) need beyond the machine's own torch, Triton, NumPy and
# transformers. Nothing else is staged (the SmolLM2 weights are benchmarks/device_smollm2.sh's).
#
# The wheel is .devbundle's (../shared/tools/device-bundle.sh) when there is one; otherwise it is built here as that
# script builds it: FlashInfer 0.2.14.post1's PyPI release is a source archive, made into a pure-Python (JIT) wheel.
# Needs python3 and a package index, nothing of this repository's setup (no .venv).
# Commands: benchmarks/README.md ("Running on the lent GPU machine").
#
# Run here, in the repository root, once: bash benchmarks/device_flashinfer.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
version=0.2.14.post1
mkdir -p build/devwhl
if ! ls build/devwhl/flashinfer_python-$version-*.whl >/dev/null 2>&1; then
  if ls .devbundle/whl/flashinfer_python-$version-*.whl >/dev/null 2>&1; then
    cp .devbundle/whl/flashinfer_python-$version-*.whl build/devwhl/
  else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    python3 -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install -q "setuptools>=77" "packaging>=24" wheel
    # (without build isolation: preparing the archive's metadata in an isolated environment pulls in torch)
    "$tmp/venv/bin/pip" download -q --no-deps --no-build-isolation -d "$tmp/src" flashinfer-python==$version
    "$tmp/venv/bin/pip" wheel -q --no-deps --no-build-isolation -w build/devwhl "$tmp"/src/flashinfer_python-*.tar.gz
  fi
fi
du -sh build/devwhl
