"""The parity harness (``benchmarks.gpu_parity``, ``benchmarks.lib.parity``) on the CPU with its tiny smoke model: the
teacher-forced check of two identical torch paths finds no difference, and ``--reference-dtype`` puts the reference
on a wider copy of the model, so the same check then measures the candidate dtype's rounding."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from benchmarks.lib import parity


def _run(target, widen=None):
    """The teacher-forced check (2 streams, 3 turns, 1 also alone); the model, its wide copy, tokenizer, config."""
    model, tokenizer, cfg, _ = parity.build_model(SimpleNamespace(llm="dummy", seed=0, layers=2), target)
    wide = None if widen is None else widen(model)
    forced = parity.teacher_forced(model, tokenizer, cfg, target, 2, 3, 0, 1, "noise", wide)
    return forced, (model, wide, tokenizer, cfg)


def test_identical_torch_paths_agree_exactly():
    target = parity.Target("cpu", "bfloat16", 120, max_streams=4)
    forced, _ = _run(target)
    assert forced["turns"] == 6 and forced["turn_identical_fraction"] == 1.0
    assert forced["logits_rel_error_median"] == 0.0 and forced["logits_rel_error_max"] == 0.0
    assert not any(forced["pages_leaked"].values())


def test_reference_dtype_runs_the_reference_on_a_wider_copy():
    target = parity.Target("cpu", "bfloat16", 120, max_streams=4, reference_dtype="float32")
    forced, (model, wide, tokenizer, cfg) = _run(target, lambda m: copy.deepcopy(m).to(torch.float32))
    assert model.dtype == torch.bfloat16 and wide.dtype == torch.float32
    # bf16 against fp32: rounding-sized differences, in the batched candidate and the one-at-a-time path alike
    for summary in (forced, forced["noise_floor"]):
        assert 1e-4 < summary["logits_rel_error_median"] < 0.1
    assert not any(forced["pages_leaked"].values())
    # free-running: a bf16 engine against a float32 engine (the reference engine runs in the copy's dtype)
    free = parity.free_running(model, tokenizer, cfg, target, 1, 3.0, 0, wide)
    assert free["turns"] > 0 and not free["errors"] and not any(free["pages_leaked"].values())
