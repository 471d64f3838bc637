#!/usr/bin/env bash
# Load test of a running server with perf_analyzer: C concurrent audio streams, for each C of a range.
#
#   scripts/perf_sweep.sh [FILE ...]        (default FILE: build/samples/en_sample.wav)
#
# Each concurrent slot of perf_analyzer plays Triton sequences back to back; a sequence is one audio stream:
# a file cut into requests of PIECE_SECONDS (client.perf_data), START on the first, END on the last, over gRPC
# streaming, as fast as the server answers. Every level runs a fixed number of requests (SEQUENCES whole
# sequences per slot) instead of perf_analyzer's stability search, so a sweep takes a predictable time.
# Environment (defaults): URL (localhost:8001), MODEL (infinisst), CONCURRENCY (1:8:1 = start:end:step),
# PIECE_SECONDS (0.96), SEQUENCES (4), LANGUAGE (server default), OUT (build/perf), PERF_ARGS (more options).
# Writes OUT/steps.json and, per level, OUT/perf_c<C>.log (perf_analyzer's output), OUT/perf_c<C>.csv (its
# table; for a decoupled model its "latency" is request -> last response) and OUT/profile_c<C>.json (every
# response time); prints first/last-response percentiles and throughput per level (client.perf_report), also
# saved as OUT/report.json.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$root/.venv/bin/python"
pa="$root/.venv/bin/perf_analyzer"
url=${URL:-localhost:8001} model=${MODEL:-infinisst} piece=${PIECE_SECONDS:-0.96}
sequences=${SEQUENCES:-4} out=${OUT:-$root/build/perf}
IFS=: read -r c_start c_end c_step <<< "${CONCURRENCY:-1:8:1}"
c_end=${c_end:-$c_start} c_step=${c_step:-1}
files=("$@")
[ ${#files[@]} -gt 0 ] || files=("$root/build/samples/en_sample.wav")
mkdir -p "$out"

data_args=(--out "$out/steps.json" --piece-seconds "$piece")
[ -z "${LANGUAGE:-}" ] || data_args+=(--language "$LANGUAGE")
(cd "$root" && "$py" -m client.perf_data "${files[@]}" "${data_args[@]}")
steps=$("$py" -c 'import json, sys; print(min(len(s) for s in json.load(open(sys.argv[1]))["data"]))' "$out/steps.json")

profiles=()
for ((c = c_start; c <= c_end; c += c_step)); do
  echo "== concurrency $c: $sequences sequences of $steps requests per stream slot"
  # --sequence-length with variation 0: every sequence plays exactly the first $steps pieces of a file.
  # shellcheck disable=SC2086
  "$pa" -m "$model" -u "$url" -i grpc --streaming \
    --input-data "$out/steps.json" --sequence-length "$steps" --sequence-length-variation 0 \
    --concurrency-range "$c" --request-count $((sequences * c * steps)) \
    -f "$out/perf_c$c.csv" --profile-export-file "$out/profile_c$c.json" ${PERF_ARGS:-} > "$out/perf_c$c.log" 2>&1 \
    || { cat "$out/perf_c$c.log"; exit 1; }
  grep -E "Throughput|Avg latency|p9[59] latency" "$out/perf_c$c.log" || true
  profiles+=("$out/profile_c$c.json")
done
(cd "$root" && "$py" -m client.perf_report "${profiles[@]}" --json "$out/report.json")
