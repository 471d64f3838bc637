#!/usr/bin/env bash
# `make demo`: start tritonserver with model_repository/ (the demo checkpoint on CPU), wait until the model is
# ready, stream a speech sample with the client (translations print as they arrive, latencies at the end),
# then stop the server. Ports: HTTP_PORT, GRPC_PORT, METRICS_PORT (default 8000-8002); AUDIO picks the file.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
py="$root/.venv/bin/python"
http=${HTTP_PORT:-8000} grpc=${GRPC_PORT:-8001} metrics=${METRICS_PORT:-8002}
audio=${AUDIO:-build/samples/en_sample.wav}
log=build/demo-tritonserver.log

"$root/.venv/bin/tritonserver" --model-repository model_repository \
  --http-address 127.0.0.1 --grpc-address 127.0.0.1 --metrics-address 127.0.0.1 \
  --http-port "$http" --grpc-port "$grpc" --metrics-port "$metrics" > "$log" 2>&1 &
server=$!
stop() {
  kill -TERM "$server" 2>/dev/null || true
  for _ in $(seq 60); do kill -0 "$server" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$server" 2>/dev/null || true
}
trap stop EXIT

echo "[demo] tritonserver (log: $log) loading model 'infinisst' ..."
"$py" - "$http" "$server" "$log" <<'PY'
import sys, time, urllib.request, os
port, pid, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 180
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit(f"tritonserver exited:\n{open(log).read()[-3000:]}")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/infinisst/ready", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.5)
sys.exit(f"model not ready after 180 s:\n{open(log).read()[-3000:]}")
PY
echo "[demo] streaming $audio in real time to localhost:$grpc"
"$py" -m client.stream "$audio" --url "127.0.0.1:$grpc" --realtime --language de
