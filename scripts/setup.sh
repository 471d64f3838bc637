#!/usr/bin/env bash
# Set up this repository on a fresh machine, idempotently (a stamp makes a second run take about a second):
#   1. .venv with the pinned packages (requirements-dev.txt, then requirements-nodeps.txt with --no-deps);
#   2. Debian's libb64-0d for perf_analyzer, if missing;
#   3. the Triton backend folder build/triton_backends/python (Python backend + the stub for this Python);
#   4. wrappers in .venv/bin: `tritonserver` (adds --backend-directory and the venv) and `perf_analyzer`
#      (adds libcudart.so.12 to LD_LIBRARY_PATH); a .pth file puts this repository on the venv's sys.path;
#   5. the demo checkpoint build/demo_checkpoint (the default checkpoint of model_repository/infinisst) and a
#      longer speech sample build/samples/en_sample.wav;
#   6. what the training-data tests need (scripts/setup_training_data.sh --deps: requirements-train.txt, Debian
#      apertium-eng-spa); the full training corpus is `make train-data`.
# Environment: PYTHON (default python3) creates the venv; SETUP_FORCE=1 ignores the stamps.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
PYTHON=${PYTHON:-python3}
venv="$root/.venv"
build="$root/build"
log() { echo "[setup] $*" >&2; }

hash_files() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

env_hash=$(hash_files requirements.txt requirements-dev.txt requirements-nodeps.txt requirements-train.txt \
  scripts/setup.sh scripts/setup_training_data.sh)
env_stamp="$build/setup-env.stamp"

setup_venv() {
  if [ ! -x "$venv/bin/python" ]; then
    log "creating .venv with $($PYTHON --version)"
    "$PYTHON" -m venv "$venv"
  fi
  log "installing pinned packages (requirements-dev.txt)"
  "$venv/bin/python" -m pip install -q -r requirements-dev.txt
  log "installing requirements-nodeps.txt with --no-deps"
  "$venv/bin/python" -m pip install -q --no-deps -r requirements-nodeps.txt
}

ensure_libb64() {
  if ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then return; fi
  log "installing Debian libb64-0d (perf_analyzer needs it)"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq libb64-0d >/dev/null
}

site_packages() { "$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

build_backend_folder() {
  local sp pyver src dst
  sp=$(site_packages)
  pyver=$("$venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  src="$sp/pytriton/tritonserver"
  dst="$build/triton_backends/python"
  log "backend folder $dst (Python backend stub for $pyver)"
  rm -rf "$dst" && mkdir -p "$dst"
  cp "$src/backends/python/libtriton_python.so" "$src/backends/python/triton_python_backend_utils.py" "$dst/"
  # A symlink, not a copy: the stub's RPATH ($ORIGIN/../../../../nvidia_pytriton.libs) must resolve from
  # its real location inside the wheel.
  ln -s "$src/python_backend_stubs/$pyver/triton_python_backend_stub" "$dst/triton_python_backend_stub"
}

write_wrappers() {
  local sp
  sp=$(site_packages)
  echo "$root" > "$sp/infinisst_repo.pth"

  # The stub links libpython3.X.so.1.0. The venv's own interpreter's copy must win over the system's: the
  # stub runs the venv's standard library, whose C extensions may need symbols of that exact build.
  local libdir
  libdir=$("$venv/bin/python" -c 'import os, sysconfig as s; d = s.get_config_var("LIBDIR") or ""
print(d if os.path.isfile(os.path.join(d, s.get_config_var("INSTSONAME") or "-")) else "")')
  local ldline=""
  [ -z "$libdir" ] || ldline="export LD_LIBRARY_PATH=\"$libdir\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\""
  cat > "$venv/bin/tritonserver" <<EOF
#!/usr/bin/env bash
# Written by scripts/setup.sh: tritonserver 2.51 from nvidia-pytriton with this project's backend folder.
# The Python stub takes its sys.prefix from the first python on PATH, so the venv goes first.
export PATH="$venv/bin:\$PATH" VIRTUAL_ENV="$venv" HF_HUB_OFFLINE=\${HF_HUB_OFFLINE:-1}
$ldline
exec "$sp/pytriton/tritonserver/bin/tritonserver" --backend-directory "$build/triton_backends" "\$@"
EOF
  chmod +x "$venv/bin/tritonserver"

  # tritonclient installs the perf_analyzer binary itself into bin/; move it aside and wrap it.
  mkdir -p "$venv/libexec"
  local name
  for name in perf_analyzer perf_client; do
    if [ -f "$venv/bin/$name" ] && [ "$(head -c 4 "$venv/bin/$name" | tr -d '\0')" = $'\x7fELF' ]; then
      mv -f "$venv/bin/$name" "$venv/libexec/perf_analyzer"
    fi
  done
  for name in perf_analyzer perf_client; do
    cat > "$venv/bin/$name" <<EOF
#!/usr/bin/env bash
# Written by scripts/setup.sh: perf_analyzer from tritonclient 2.51 with libcudart.so.12 on the library path.
export LD_LIBRARY_PATH="$sp/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$venv/libexec/perf_analyzer" "\$@"
EOF
    chmod +x "$venv/bin/$name"
  done
}

build_demo_checkpoint() {
  # The demo builder skips an up-to-date checkpoint itself (it checks its recipe version); the stamp only saves
  # starting Python when none of the files that define the checkpoint changed.
  local ckpt="$build/demo_checkpoint" hash
  if [ ! -f infinisst_backend/model/demo.py ]; then
    log "WARNING: infinisst_backend/model/demo.py is missing; no demo checkpoint built"
    return
  fi
  hash=$(hash_files infinisst_backend/model/demo.py infinisst_backend/model/checkpoint.py infinisst_backend/config.py \
    infinisst_backend/presets.py requirements-nodeps.txt)
  if [ -f "$build/demo-checkpoint.stamp" ] && [ "$(cat "$build/demo-checkpoint.stamp")" = "$hash" ] \
    && [ -f "$ckpt/config.json" ] && [ "${SETUP_FORCE:-0}" != 1 ]; then
    return
  fi
  log "building the demo checkpoint in $ckpt"
  HF_HUB_OFFLINE=1 "$venv/bin/python" -m infinisst_backend.model.demo "$ckpt"
  echo "$hash" > "$build/demo-checkpoint.stamp"
}

mkdir -p "$build"
if [ -f "$env_stamp" ] && [ "$(cat "$env_stamp")" = "$env_hash" ] && [ "${SETUP_FORCE:-0}" != 1 ] \
  && [ -x "$venv/bin/tritonserver" ] && [ -e "$build/triton_backends/python/triton_python_backend_stub" ]; then
  :
else
  setup_venv
  ensure_libb64
  build_backend_folder
  write_wrappers
  "$venv/bin/python" scripts/make_sample.py "$build/samples/en_sample.wav"
  bash scripts/setup_training_data.sh --deps
  echo "$env_hash" > "$env_stamp"
fi
build_demo_checkpoint
log "ready: . .venv/bin/activate; tritonserver --model-repository model_repository"
