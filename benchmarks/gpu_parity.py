"""FlashInfer path vs torch path on the GPU: same weights, same streams; writes a report.

Three checks, at the paper's dimensions with random bf16 weights (``--layers`` to shrink):

1. **Teacher-forced runner parity.** Two ``ModelRunner``s share the model, one with ``TorchAttention`` (the
   reference) and one with ``FlashInferAttention``. Streams of noise go through both turn by turn (one speech
   encoding, shared), each turn with a seeded forced length; both runners are fed the torch path's greedy tokens,
   so an early difference cannot snowball. Per step: ``|logits_fi - logits_torch| / |logits_torch|`` and whether
   the argmax agrees; a turn is identical when every step's argmax agrees. The streams run long enough for the
   1000-token window to evict (turn-aligned compaction with re-rotation runs on both). Layer 0's K/V depend on
   nothing the backends compute, so they must be written bit-identically.
   The bf16 noise floor is measured alongside: a third runner (torch attention) runs some streams one at a time,
   so only the batch composition (hence the GEMMs' rounding) differs from the reference. FlashInfer passes when
   it is within ``FLOOR_FACTOR`` of that floor; the ">= 99% identical turns" criterion is reported as is (random
   weights have near-tied top logits, so bf16 rounding alone flips some argmaxes, in the reference too).
2. **Free-running engines.** Two ``Engine``s (torch, flashinfer), the same streams, real greedy decoding: the
   fraction of turns with identical ids (one differing token changes all later context, so this is stricter).
3. **No page leak.** After every run, every KV page is back in the pool (greedy and beam 4 streams).

    python benchmarks/gpu_parity.py --out docs/benchmarks/gpu_parity
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT, DecodingConfig, EngineConfig
from infinisst_backend.engine import Engine
from infinisst_backend.events import StreamError, TurnEnded
from infinisst_backend.model_runner import ModelRunner
from infinisst_backend.prompt import PromptBuilder
from infinisst_backend.stream import eviction_cut

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_streams import (  # noqa: E402  (a sibling script, not a package)
    TurnLengths,
    build_dummy_model,
    gpu_info,
    paper_model_config,
    synthetic_llama3_tokenizer,
)

WINDOW = 1000
TURN_MATCH_REQUIRED = 0.99
FLOOR_FACTOR = 2.0  # FlashInfer may differ from torch at most this many times as much as torch from itself


def engine_config(backend: str, num_pages: int, **overrides) -> EngineConfig:
    base = dict(
        device="cuda",
        dtype="bfloat16",
        attention_backend=backend,
        max_batch_size=64,
        page_size=16,
        num_pages=num_pages,
        max_streams=64,
        max_llm_cache_tokens=WINDOW,
        batch_timeout_s=0.0,
        stream_idle_timeout_s=1e9,
    )
    base.update(overrides)
    return EngineConfig(**base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


class _Compare:
    """Per-step agreement of one path's logits with the reference's."""

    def __init__(self):
        self.errors: list[float] = []
        self.steps: list[bool] = []
        self.turns: list[bool] = []

    def add(self, logits: torch.Tensor, ref: torch.Tensor) -> bool:
        self.errors.append(_rel(logits, ref))
        same = bool(logits.argmax() == ref.argmax())
        self.steps.append(same)
        return same

    def summary(self) -> dict:
        errors = np.array(self.errors)
        return {
            "turns": len(self.turns),
            "steps": len(self.steps),
            "turn_identical_fraction": float(np.mean(self.turns)),
            "step_argmax_agreement": float(np.mean(self.steps)),
            "logits_rel_error_median": float(np.median(errors)),
            "logits_rel_error_p99": float(np.percentile(errors, 99)),
            "logits_rel_error_max": float(errors.max()),
        }


def teacher_forced(model, tokenizer, model_cfg, streams: int, chunks: int, seed: int, solo: int) -> dict:
    """Check 1: the FlashInfer runner and the torch runner, both fed the torch path's tokens, turn by turn.

    The bf16 noise floor: the first ``solo`` streams also run through a third runner (torch attention) one
    sequence at a time. Only the batch composition differs from the reference (so the GEMMs round differently),
    which is how far two correct bf16 implementations drift apart.
    """
    ref = ModelRunner(model, engine_config("torch", 4096), 4096)
    fi = ModelRunner(model, engine_config("flashinfer", 4096), 4096)
    alone = ModelRunner(model, engine_config("torch", 2048), 2048)
    runners = (ref, fi, alone)
    prompts = PromptBuilder(tokenizer, model_cfg.prompt)
    rng = np.random.default_rng(seed)
    lengths = TurnLengths(seed)
    caches = [model.speech.new_cache(1) for _ in range(streams)]
    seqs = [tuple(r.new_sequence() for r in runners) for _ in range(streams)]
    checkpoints: list[list[int]] = [[] for _ in range(streams)]
    system_len = prompts.first_turn("German", 1).system_len
    fi_cmp, floor_cmp = _Compare(), _Compare()
    evictions = 0
    layer0_equal = True
    for k in range(chunks):
        audio = [(0.1 * rng.standard_normal(SAMPLES_PER_UNIT)).astype(np.float32) for _ in range(streams)]
        speech = ref.encode_speech(caches, audio)  # shared by all paths
        turn = [prompts.first_turn("German", 1) if k == 0 else prompts.next_turn(1) for _ in range(streams)]
        parts = [(p.prefix_ids, emb, p.suffix_ids) for p, emb in zip(turn, speech)]
        logits_ref = ref.prefill([s[0] for s in seqs], parts)
        logits_fi = fi.prefill([s[1] for s in seqs], parts)
        logits_solo = {i: alone.prefill([seqs[i][2]], [parts[i]])[0] for i in range(solo)}
        if k == 0:
            layer0_equal = bool(torch.equal(ref.kv.kv_layers[0], fi.kv.kv_layers[0]))
        remaining = [lengths.draw(1, 10) for _ in range(streams)]
        fi_same, floor_same = [True] * streams, [True] * solo
        active = list(range(streams))
        while True:
            for row, i in enumerate(active):
                fi_same[i] &= fi_cmp.add(logits_fi[row], logits_ref[row])
                if i < solo:
                    floor_same[i] &= floor_cmp.add(logits_solo[i], logits_ref[row])
                remaining[i] -= 1
            tokens = logits_ref.argmax(-1).tolist()
            nxt = [(row, i) for row, i in enumerate(active) if remaining[i] > 0]  # the last token is never fed
            if not nxt:
                break
            active = [i for _, i in nxt]
            feed = [tokens[row] for row, _ in nxt]
            logits_ref = ref.decode([seqs[i][0] for i in active], feed)
            logits_fi = fi.decode([seqs[i][1] for i in active], feed)
            logits_solo = {i: alone.decode([seqs[i][2]], [t])[0] for i, t in zip(active, feed) if i < solo}
        fi_cmp.turns += fi_same
        floor_cmp.turns += floor_same
        for i, triple in enumerate(seqs):
            length = triple[0].num_tokens
            checkpoints[i].append(length)
            cut = eviction_cut(checkpoints[i], length, WINDOW, system_len)
            if cut is not None:
                for runner, seq in zip(runners, triple):
                    if seq.num_tokens:
                        runner.compact(seq, system_len, cut)
                evictions += 1
    for triple in seqs:
        for seq in triple:
            seq.release()
    return {
        "streams": streams,
        "evictions": evictions,
        **fi_cmp.summary(),
        "layer0_kv_bit_identical": layer0_equal,
        "noise_floor": {"streams": solo, **floor_cmp.summary()},
        "pages_leaked": {
            name: r.pool.num_pages - r.pool.num_free for name, r in zip(("torch", "flashinfer", "torch_solo"), runners)
        },
    }


def run_engine(model, tokenizer, model_cfg, backend: str, streams: int, seconds: float, beam: int, seed: int) -> dict:
    """Streams of noise through an engine on the caller's thread; the turn ids per stream and the leak check."""
    engine = Engine(model, tokenizer, model_cfg, engine_config(backend, 8192))
    rng = np.random.default_rng(seed)
    for i in range(streams):
        engine.open_stream(i, "German", 1, DecodingConfig(beam_size=beam))
    audio = [(0.1 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32) for _ in range(streams)]
    chunk = SAMPLES_PER_UNIT
    for k in range(0, audio[0].size, chunk):
        for i in range(streams):
            engine.add_audio(i, audio[i][k : k + chunk], tag=k, end=k + chunk >= audio[i].size)
        engine.run_until_idle()
    engine.run_until_idle()
    turns = {i: [] for i in range(streams)}
    errors = []
    for event in engine.events:
        if isinstance(event, TurnEnded):
            turns[event.stream_id].append(list(event.token_ids))
        elif isinstance(event, StreamError):
            errors.append(event.message)
    pool = engine.runner.pool
    return {"turns": turns, "errors": errors, "pages_leaked": pool.num_pages - pool.num_free, "stats": engine.stats()}


def free_running(model, tokenizer, model_cfg, streams: int, seconds: float, seed: int) -> dict:
    """Check 2 and 3: the same streams through a torch engine and a FlashInfer engine (greedy), plus beam 4."""
    ref = run_engine(model, tokenizer, model_cfg, "torch", streams, seconds, 1, seed)
    fi = run_engine(model, tokenizer, model_cfg, "flashinfer", streams, seconds, 1, seed)
    beam = run_engine(model, tokenizer, model_cfg, "flashinfer", max(1, streams // 2), seconds / 2, 4, seed)
    same, total, first_diff = 0, 0, {}
    for i in range(streams):
        a, b = ref["turns"][i], fi["turns"][i]
        total += max(len(a), len(b))
        for k, (x, y) in enumerate(zip(a, b)):
            same += x == y
            if x != y and i not in first_diff:
                first_diff[i] = k
    return {
        "streams": streams,
        "turns": total,
        "turn_identical_fraction": same / max(1, total),
        "first_differing_turn": first_diff,
        "turn_tokens_mean": float(np.mean([len(t) for ts in fi["turns"].values() for t in ts])),
        "errors": ref["errors"] + fi["errors"] + beam["errors"],
        "pages_leaked": {"torch": ref["pages_leaked"], "flashinfer": fi["pages_leaked"], "beam4": beam["pages_leaked"]},
        "beam4_turns": sum(len(t) for t in beam["turns"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/gpu_parity", help="path without suffix")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=48, help="turns per stream in the teacher-forced check")
    parser.add_argument("--engine-seconds", type=float, default=20.0)
    parser.add_argument("--solo", type=int, default=4, help="streams also run one at a time (noise floor)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_parity.py needs a CUDA GPU")
    t0 = time.perf_counter()
    model_cfg = paper_model_config(args.layers)
    model = build_dummy_model(model_cfg, "cuda", torch.bfloat16, seed=args.seed)
    tokenizer = synthetic_llama3_tokenizer()
    forced = teacher_forced(model, tokenizer, model_cfg, args.streams, args.chunks, args.seed, args.solo)
    print("teacher-forced:", json.dumps(forced), flush=True)
    free = free_running(model, tokenizer, model_cfg, max(1, args.streams // 2), args.engine_seconds, args.seed)
    print("free-running:", json.dumps({k: v for k, v in free.items() if k != "first_differing_turn"}), flush=True)
    floor = forced["noise_floor"]
    leaks = list(forced["pages_leaked"].values()) + list(free["pages_leaked"].values())
    checks = {
        "turns_identical_teacher_forced >= 0.99": forced["turn_identical_fraction"] >= TURN_MATCH_REQUIRED,
        "logits_error_within_bf16_noise_floor": forced["logits_rel_error_median"]
        <= FLOOR_FACTOR * floor["logits_rel_error_median"],
        "argmax_flips_within_bf16_noise_floor": 1 - forced["step_argmax_agreement"]
        <= FLOOR_FACTOR * (1 - floor["step_argmax_agreement"]) + 0.005,
        "layer0_kv_bit_identical": forced["layer0_kv_bit_identical"],
        "no_page_leak": not any(leaks),
        "no_stream_errors": not free["errors"],
    }
    report = {
        "command": "python benchmarks/gpu_parity.py " + " ".join(sys.argv[1:]),
        "environment": gpu_info("cuda"),
        "layers": args.layers,
        "teacher_forced": forced,
        "free_running": free,
        "checks": checks,
        "passed": all(checks.values()),
        # With random weights the top logits are near-ties, so bf16 rounding alone flips some argmaxes (see the
        # noise floor): the turn-identity criterion is reported, everything else must hold.
        "passed_except_turn_identity": all(v for k, v in checks.items() if not k.startswith("turns_identical")),
        "elapsed_s": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    env = report["environment"]
    lines = [
        "# FlashInfer vs torch attention on the GPU",
        "",
        f"{env['gpu']}, torch {env['torch']}, FlashInfer {env.get('flashinfer', '?')}; paper dimensions "
        f"({args.layers} LLM layers), random bf16 weights, greedy m=1.",
        "",
        f"Command: `{report['command']}`",
        "",
        "| check | value | pass |",
        "|---|---|---|",
        f"| turns identical, teacher-forced ({forced['turns']} turns, {forced['evictions']} evictions) | "
        f"{forced['turn_identical_fraction']:.4f} | {checks['turns_identical_teacher_forced >= 0.99']} |",
        f"| step argmax agreement ({forced['steps']} steps) | {forced['step_argmax_agreement']:.4f} | "
        f"{checks['argmax_flips_within_bf16_noise_floor']} |",
        f"| logits rel. error median / p99 / max | {forced['logits_rel_error_median']:.2e} / "
        f"{forced['logits_rel_error_p99']:.2e} / {forced['logits_rel_error_max']:.2e} | "
        f"{checks['logits_error_within_bf16_noise_floor']} |",
        f"| noise floor (torch batched vs torch one stream at a time, {floor['turns']} turns): turns identical / "
        f"step agreement / logits rel. error median | {floor['turn_identical_fraction']:.4f} / "
        f"{floor['step_argmax_agreement']:.4f} / {floor['logits_rel_error_median']:.2e} | |",
        f"| layer-0 K/V bit-identical | {forced['layer0_kv_bit_identical']} | {checks['layer0_kv_bit_identical']} |",
        f"| free-running engines: turns identical ({free['turns']} turns) | {free['turn_identical_fraction']:.4f} | "
        "(informational) |",
        f"| pages leaked (torch / flashinfer runs, engines incl. beam 4) | {leaks} | {checks['no_page_leak']} |",
        "",
        f"Overall: {'PASS' if report['passed'] else 'FAIL'}.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"parity {'PASS' if report['passed'] else 'FAIL'} in {report['elapsed_s']:.0f} s: {checks}")


if __name__ == "__main__":
    main()
