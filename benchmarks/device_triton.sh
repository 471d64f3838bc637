#!/usr/bin/env bash
# Stage what `gpu_triton.py` needs on the lent GPU machine beyond .devbundle: the project's pinned NumPy 1 stack.
#
# Triton 2.51's Python stub sends outputs built from NumPy 2 arrays as empty tensors, and the machine's python3 has
# NumPy 2.5 (and a SciPy built for it, which transformers imports). The model refuses to load under NumPy 2
# (serving.check_stub_numpy), so the stub must import numpy 1.26.4, scipy 1.17.1 and transformers 5.24.0 (the pins
# of requirements-gpu.txt) from /tmp/site, ahead of the machine's own packages. They do not fit beside .devbundle
# in one call's 64 MiB, so they travel in two calls on the same warm machine (make the second right away):
#   call 1, carry [".devbundle", ".fi-cache"]: .devbundle/whl/ holds numpy 1.26.4 (this script puts it there;
#           env.sh installs every wheel of that folder into /tmp/site), and a .pth puts /tmp/site first on sys.path
#   call 2, carry ["build/devtriton"]: scipy and transformers into /tmp/site, then the benchmark
# Commands: benchmarks/README.md ("Through tritonserver on the lent GPU machine").
#
# Run here, in the repository root, once (after ../shared/tools/device-bundle.sh): bash benchmarks/device_triton.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
[ -d .devbundle/whl ] || { echo "no .devbundle: run ../shared/tools/device-bundle.sh first" >&2; exit 1; }
get() {  # wheels for the machine's CPython 3.12
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$1" "$2"
}
ls .devbundle/whl/numpy-1.26.4-*.whl >/dev/null 2>&1 || get .devbundle/whl numpy==1.26.4
# perf_analyzer's wheel (7 MB) makes room for NumPy; move it back to use perf_analyzer on the machine.
mkdir -p build/devbundle-aside
mv .devbundle/whl/perf_analyzer-*.whl build/devbundle-aside/ 2>/dev/null || true
mkdir -p build/devtriton
ls build/devtriton/scipy-1.17.1-*.whl >/dev/null 2>&1 || get build/devtriton scipy==1.17.1
ls build/devtriton/transformers-5.24.0-*.whl >/dev/null 2>&1 || get build/devtriton transformers==5.24.0
du -sh .devbundle build/devtriton
