"""A real tritonserver for the server tests: test model repositories, free ports, readiness, clean shutdown."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from server_tools import tritonserver
from server_tools.metrics import metric_values
from server_tools.model_config import rewrite_config
from server_tools.processes import process_cmdlines

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_repository" / "infinisst"
TRITONSERVER = Path(sys.prefix) / "bin" / "tritonserver"  # the wrapper scripts/setup.sh writes into the venv
PERF_ANALYZER = Path(sys.prefix) / "bin" / "perf_analyzer"
DEMO_CHECKPOINT = ROOT / "build" / "demo_checkpoint"


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


class TritonServer(tritonserver.TritonServer):
    """The venv's tritonserver (scripts/setup.sh's wrapper) on CPU, for the server tests: a model that fails to
    load does not stop it (one of the tests)."""

    def __init__(
        self, repository: Path, log_path: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ):
        super().__init__(
            repository,
            log_path,
            binary=TRITONSERVER,
            extra_args=("--exit-on-error=false", "--log-verbose=0", *extra_args),
            env={"HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        )

    def start(self) -> None:
        if not TRITONSERVER.exists():
            raise RuntimeError(f"{TRITONSERVER} is missing: run `make setup` (scripts/setup.sh) first")
        super().start()


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
