"""A real tritonserver for the server tests: test model repositories, free ports, readiness, clean shutdown."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from client.soak import process_cmdlines

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_repository" / "infinisst"
TRITONSERVER = Path(sys.prefix) / "bin" / "tritonserver"  # the wrapper scripts/setup.sh writes into the venv
PERF_ANALYZER = Path(sys.prefix) / "bin" / "perf_analyzer"
DEMO_CHECKPOINT = ROOT / "build" / "demo_checkpoint"

_PARAM = re.compile(r'(\{ key: "(\w+)" value: \{ string_value: ")([^"]*)(" \} \})')


def config_parameters(text: str) -> dict[str, str]:
    """The ``parameters`` of a config.pbtxt written in this repository's one-line style."""
    return {m.group(2): m.group(3) for m in _PARAM.finditer(text)}


def rewrite_config(text: str, name: str, overrides: dict[str, str]) -> str:
    """config.pbtxt with another model name and some parameter values replaced (or added)."""
    text = re.sub(r'^name: "[^"]*"', f'name: "{name}"', text, count=1, flags=re.M)
    missing = dict(overrides)

    def replace(m: re.Match) -> str:
        value = missing.pop(m.group(2), m.group(3))
        return f"{m.group(1)}{value}{m.group(4)}"

    text = _PARAM.sub(replace, text)
    if missing:
        extra = ",\n".join(f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in missing.items())
        text = re.sub(r"\n\]\s*$", f",\n{extra}\n]\n", text)
    return text


def write_repository(dst: Path, models: dict[str, dict[str, str]], triton_idle_s: float | None = None) -> Path:
    """A model repository with one copy of model_repository/infinisst per entry (name -> parameter overrides).

    ``triton_idle_s`` shortens Triton's own sequence idle reaper, so that sequences a test leaves open (a
    disconnected client) do not hold up the server's exit for its whole exit timeout.
    """
    source = (MODEL_DIR / "config.pbtxt").read_text()
    if triton_idle_s is not None:
        idle = f"max_sequence_idle_microseconds: {int(triton_idle_s * 1e6)}"
        source = re.sub(r"max_sequence_idle_microseconds: \d+", idle, source)
    for name, overrides in models.items():
        (dst / name / "1").mkdir(parents=True)
        shutil.copy(MODEL_DIR / "1" / "model.py", dst / name / "1" / "model.py")
        (dst / name / "config.pbtxt").write_text(rewrite_config(source, name, overrides))
    return dst


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """tritonserver on loopback ports, in its own process group (its Python stubs die with it)."""

    def __init__(
        self, repository: Path, log_path: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ):
        self.repository = repository
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.env = dict(env or {})  # added to the server's environment
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        if not TRITONSERVER.exists():
            raise RuntimeError(f"{TRITONSERVER} is missing: run `make setup` (scripts/setup.sh) first")
        command = [
            str(TRITONSERVER),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            "--exit-on-error=false",  # a model that fails to load is one of the tests
            "--log-verbose=0",
            *self.extra_args,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **self.env}
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT
            )

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def wait_ready(self, models: list[str], failing: list[str] = (), timeout: float = 180.0) -> None:
        """Wait until every model in ``models`` is ready and every one in ``failing`` has failed to load."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self.log()}")
            try:
                states = {m["name"]: m.get("state") for m in self.model_index()}
            except OSError:
                states = {}
            if all(states.get(m) == "READY" for m in models) and all(states.get(m) == "UNAVAILABLE" for m in failing):
                return
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready within {timeout} s:\n{self.log()}")

    def _http(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def model_index(self) -> list[dict]:
        return json.loads(self._http("POST", "/v2/repository/index", b"{}"))

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (Triton's graceful exit), then SIGKILL the whole process group if needed."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        code = self.process.poll()
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # stray stubs of the group, if any
        except ProcessLookupError:
            pass
        self.process.wait()
        return code


def metric_values(text: str, name: str) -> dict[str, float]:
    """Samples of one metric from Prometheus text: {label string: value}."""
    values = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            values[head[len(name) :]] = float(value)
    return values


def model_gauge(server: TritonServer, name: str, model: str = "infinisst") -> float | None:
    """A custom metric of one model, summed over its instances (None while the model has no series)."""
    values = [v for labels, v in metric_values(server.metrics(), name).items() if f'model="{model}"' in labels]
    return sum(values) if values else None


def wait_gauge(server: TritonServer, name: str, predicate, model: str = "infinisst", timeout: float = 15.0):
    """Poll ``model_gauge`` until ``predicate(value)`` holds or ``timeout`` passes; returns the last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = model_gauge(server, name, model)
        if (value is not None and predicate(value)) or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def process_status(pid: int) -> dict[str, str]:
    """``/proc/<pid>/status`` as a dict (VmRSS, Threads, ...); empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def stub_pids(server: TritonServer, model: str) -> list[int]:
    """The server's Python-backend stub processes serving ``model`` (their command line names its model.py)."""
    model_py = str(server.repository / model / "1" / "model.py").encode()
    return [
        pid for pid, argv in process_cmdlines() if argv[0].endswith(b"triton_python_backend_stub") and model_py in argv
    ]
