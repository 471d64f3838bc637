"""tritonserver as a child process, for load tools, benchmarks and tests: free loopback ports, readiness, metrics
and a clean stop.

    server = TritonServer(Path("gpu_repository"), Path("build/tritonserver.log"))
    server.start()
    server.wait_ready(["infinisst"], timeout=600)
    ...  # StreamingClient(server.grpc_url)
    server.stop()

The server runs in its own process group, so its Python-backend stubs go with it on :meth:`stop`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` TCP ports free on the loopback interface now."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class TritonServer:
    """One tritonserver on free loopback ports.

    ``binary``: the tritonserver to run (a path, or a name on PATH); ``extra_args`` go after the project's;
    ``env`` is added to the environment (the project root is put on ``PYTHONPATH`` for the model's imports).
    """

    def __init__(
        self,
        repository: Path,
        log_path: Path,
        binary: str | Path = "tritonserver",
        extra_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
    ):
        self.repository = repository
        self.log_path = log_path
        self.binary = binary
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.process: subprocess.Popen | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self) -> None:
        command = [
            str(self.binary),
            f"--model-repository={self.repository}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            "--metrics-address=127.0.0.1",
            *self.extra_args,
        ]
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONPATH": pythonpath, **self.env}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=ROOT
            )

    def log(self, tail: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-tail:]

    def wait_ready(self, models: list[str], failing: Iterable[str] = (), timeout: float = 180.0) -> float:
        """Wait until every model in ``models`` is ready and every one in ``failing`` has failed to load; returns
        the seconds waited. Raises with the server's error lines if it exits or the time runs out."""
        failing = list(failing)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.process.returncode}:\n{self._errors()}")
            try:
                states = {m["name"]: m.get("state") for m in self.model_index()}
            except OSError:
                states = {}
            if all(states.get(m) == "READY" for m in models) and all(states.get(m) == "UNAVAILABLE" for m in failing):
                return time.monotonic() - start
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver not ready within {timeout} s:\n{self._errors()}")

    def model_index(self) -> list[dict]:
        return json.loads(self._http("POST", "/v2/repository/index", b"{}"))

    def metrics(self) -> str:
        """The server's metrics as Prometheus text (parse them with :func:`server_tools.metrics.metric_values`)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.read().decode()

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM (Triton's graceful exit), then SIGKILL the whole process group if needed; the exit code of a
        graceful exit, else None."""
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

    def _http(self, method: str, path: str, body: bytes | None = None) -> bytes:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def _errors(self) -> str:
        """The log's error lines (Triton starts them with 'E'), or its tail when it has none."""
        text = self.log(tail=200_000)
        errors = [line for line in text.splitlines() if line.startswith("E")]
        return "\n".join(errors[:10]) if errors else text[-4000:]
