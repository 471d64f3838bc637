"""The server-side tools without a server: the GPU repository is model_repository/infinisst/config.pbtxt with GPU
values (one source for the model's configuration, checked here against drift), the Prometheus metrics parser and
the percentiles the reports print."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from client.stats import percentiles
from infinisst_backend.serving import parameters
from server_tools import gen_gpu_repo
from server_tools.metrics import metric_values, model_metric
from server_tools.model_config import CONFIG, MODEL_PY, config_field, config_parameters, rewrite_config


@pytest.fixture
def ckpt(tmp_path) -> Path:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "config.json").write_text("{}")
    return tmp_path / "c"


def _without_values(text: str) -> list[str]:
    """The lines of a config.pbtxt without comments, values, name and instance group: its structure."""
    text = re.sub(r"^instance_group \[.*?\]$", "instance_group", text, flags=re.M | re.S)
    text = re.sub(r'(string_value: ")[^"]*"', r'\1"', text)
    text = re.sub(r'^(name: |\s*max_batch_size: |\s*max_sequence_idle_microseconds: |\s*max_candidate_sequences: ).*$',
                  r"\1", text, flags=re.M)  # fmt: skip
    return [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_gpu_config_is_the_repository_config_with_gpu_values():
    """Everything but the GPU values, the model's name and checkpoint and its instance group comes from
    model_repository/infinisst/config.pbtxt: a parameter added there reaches the GPU repository as it is."""
    source = CONFIG.read_text()
    gpu = gen_gpu_repo.render("infinisst_en_de", Path("/ckpt/en-de"), "de", [0, 2], {"beam_size": "4"})
    assert _without_values(gpu) == _without_values(source)
    params, gpu_params = config_parameters(source), config_parameters(gpu)
    assert list(gpu_params) == list(params)
    changed = {k for k in params if gpu_params[k] != params[k]}
    assert changed <= set(gen_gpu_repo.GPU_DEFAULTS) | {"checkpoint", "default_language", "beam_size"}
    assert gpu_params["checkpoint"] == "/ckpt/en-de" and gpu_params["default_language"] == "de"
    assert gpu_params["beam_size"] == "4" and gpu_params["attention_backend"] == "flashinfer"
    assert config_field(gpu, "max_batch_size") == gen_gpu_repo.GPU_DEFAULTS["triton_max_batch_size"]
    assert config_field(gpu, "max_candidate_sequences") == config_field(source, "max_candidate_sequences")
    assert gpu.count("kind: KIND_GPU") == 2 and "gpus: [ 2 ]" in gpu and "KIND_CPU" not in gpu


def test_every_gpu_default_names_a_field_of_the_repository_config():
    """A GPU value for a parameter that config.pbtxt no longer has fails the render (no silent second copy)."""
    params = config_parameters(CONFIG.read_text())
    for key in gen_gpu_repo.GPU_DEFAULTS:
        assert key in params or key in gen_gpu_repo.TRITON_FIELDS, key
    assert set(parameters.PARAMETERS) <= set(params)  # config.pbtxt keeps up with the config objects
    with pytest.raises(ValueError, match="no_such_parameter"):
        rewrite_config(CONFIG.read_text(), "x", {"no_such_parameter": "1"}, add_missing=False)


def test_gen_gpu_repo_writes_valid_configs(tmp_path, ckpt):
    models = [gen_gpu_repo.parse_model(f"en-de={ckpt}"), gen_gpu_repo.parse_model(f"en-zh={ckpt}")]
    gen_gpu_repo.write(tmp_path / "repo", models, [0, 1, 3], {"beam_size": "4"})
    for name, language in (("infinisst_en_de", "de"), ("infinisst_en_zh", "zh")):
        text = (tmp_path / "repo" / name / "config.pbtxt").read_text()
        assert f'name: "{name}"' in text
        assert text.count("kind: KIND_GPU") == 3 and "gpus: [ 3 ]" in text
        assert (tmp_path / "repo" / name / "1" / "model.py").read_text() == MODEL_PY.read_text()
        cfg = parameters.serving_config_from_parameters(config_parameters(text), "cuda:0", tmp_path)
        assert cfg.checkpoint == ckpt and cfg.engine.default_language == language
        assert cfg.engine.decoding.beam_size == 4 and cfg.engine.attention_backend == "flashinfer"
        assert cfg.engine.kv_memory_fraction == pytest.approx(0.75 / 2)  # the GPU default split over 2 models
        assert cfg.engine.cuda_graphs and cfg.engine.batch_timeout_s == pytest.approx(0.05)
    assert gen_gpu_repo.parse_model(str(ckpt))[0] == "infinisst"
    with pytest.raises(ValueError, match="beam_sise"):
        gen_gpu_repo.write(tmp_path / "r2", models, [0], {"beam_sise": "4"})
    with pytest.raises(ValueError, match="--gpus"):
        gen_gpu_repo.write(tmp_path / "r3", models, [], {})
    assert gen_gpu_repo.main(["--out", str(tmp_path / "r4"), "--model", str(ckpt), "--gpus", "0"]) == 0
    assert (tmp_path / "r4" / "infinisst" / "config.pbtxt").is_file()


METRICS = """\
# HELP nv_inference_request_success Number of successful inference requests, all batch sizes
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="infinisst",version="1"} 12
nv_inference_request_success{model="infinisst_one",version="1"} 3
# HELP infinisst_generated_tokens_total Target tokens generated
# TYPE infinisst_generated_tokens_total counter
infinisst_generated_tokens_total{instance="infinisst_0_0",model="infinisst"} 40
# HELP infinisst_kv_pages_used KV pages in use
# TYPE infinisst_kv_pages_used gauge
infinisst_kv_pages_used{instance="infinisst_0_0",model="infinisst"} 7
infinisst_kv_pages_used{instance="infinisst_0_1",model="infinisst"} 5
# HELP infinisst_batch_size Rows per step
# TYPE infinisst_batch_size histogram
infinisst_batch_size_count{instance="infinisst_0_0",model="infinisst",phase="decode"} 9
infinisst_batch_size_sum{instance="infinisst_0_0",model="infinisst",phase="decode"} 30
infinisst_batch_size_bucket{instance="infinisst_0_0",model="infinisst",phase="decode",le="+Inf"} 9
"""


def test_metric_values_reads_samples_by_their_name_in_the_text():
    assert metric_values(METRICS, "nv_inference_request_success") == {
        '{model="infinisst",version="1"}': 12.0,
        '{model="infinisst_one",version="1"}': 3.0,
    }
    assert metric_values(METRICS, "infinisst_generated_tokens_total") == {
        '{instance="infinisst_0_0",model="infinisst"}': 40.0
    }
    assert metric_values(METRICS, "infinisst_batch_size_count") == {
        '{instance="infinisst_0_0",model="infinisst",phase="decode"}': 9.0
    }
    assert metric_values(METRICS, "infinisst_batch_size") == {}  # a histogram's samples have their own names
    assert metric_values(METRICS, "infinisst_kv_pages") == {}  # no prefix matches
    assert model_metric(METRICS, "infinisst_kv_pages_used", "infinisst") == 12.0
    assert model_metric(METRICS, "nv_inference_request_success", "infinisst_one") == 3.0


def test_percentiles():
    assert percentiles([]) == {"n": 0, "p50": None, "p90": None, "p95": None, "p99": None, "max": None}
    summary = percentiles([0.1, 0.3, 0.2, 0.4], (50, 99))
    assert list(summary) == ["n", "p50", "p99", "max"] and summary["n"] == 4 and summary["max"] == 0.4
    assert summary["p50"] == pytest.approx(0.25)
    assert percentiles([1.0], count=False, maximum=False) == {"p50": 1.0, "p90": 1.0, "p95": 1.0, "p99": 1.0}
