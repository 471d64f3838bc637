"""Kernel-by-kernel profile of the LLM's decode and prefill steps at the paper's dimensions (GPU, FlashInfer).

Builds the Llama-3.1-8B-sized LLM with random bf16 weights (``benchmarks.lib.models.build_dummy_model``), fills a KV
pool with random values, and for each variant of the attention times decode steps (``--batch``: rows, every row with a
``--context``-token cache) and a steady-state prefill (``--prefill-batch`` streams, a later turn's 22-token prompt
each), through the runner's CUDA graphs as serving runs them. At ``--profile-batch`` it prints the CUDA kernels of
one step grouped by name and by kind (GEMM, attention, elementwise, ...), in microseconds per step:

    python -m benchmarks.profile_llm --batch 1,32,64,128,256 --variants reference,fused --out DIR

Variants: ``reference`` (the graphs capture the torch ops, ``EngineConfig.fused_kernels=False``), ``fused`` (the
default: :mod:`infinisst_backend.kernels.llm_kernels`' fused RMSNorm, RoPE + K/V write and SwiGLU) and
``fused+tensor_cores`` (also ``decode_tensor_cores``: decode through FlashInfer's tensor-core prefill kernels). Every
variant sees the same weights and cache contents, so the script also prints how far each variant's decode logits are
from the first variant's.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.lib.gpu import gpu_info, median_time
from benchmarks.lib.kernel_profile import kernel_profile, print_profile
from benchmarks.lib.models import LATER_TURN_PREFIX, LATER_TURN_SUFFIX, PAGE_SIZE, build_dummy_model
from infinisst_backend.config import EMBEDDINGS_PER_UNIT, EngineConfig
from infinisst_backend.presets import paper_model_config
from infinisst_backend.runtime.model_runner import ModelRunner

# EngineConfig overrides of each variant (graphs on in all)
VARIANTS = {
    "reference": {"fused_kernels": False},  # the torch ops in the graphs
    "fused": {"fused_kernels": True},  # llm_kernels' fused norm, RoPE + K/V write and SwiGLU (the default)
    "fused+tensor_cores": {"fused_kernels": True, "decode_tensor_cores": True},  # decode on FlashInfer's TC kernels
}


def median_ms(fn, repeats: int) -> float:
    """Median wall time of ``fn`` in ms, synchronized, after one warm-up call."""
    return 1e3 * median_time(fn, repeats, "cuda", warmup=1)


def run_variant(model, name: str, args, batches: list[int]) -> dict:
    hidden = model.llm.cfg.hidden_size
    pages_per_seq = math.ceil((args.context + 200) / PAGE_SIZE)
    max_rows = max(batches + [args.prefill_batch])
    num_pages = max_rows * pages_per_seq + 8
    cfg = EngineConfig(
        device="cuda",
        dtype="bfloat16",
        attention_backend="flashinfer",
        max_batch_size=max(batches),
        page_size=PAGE_SIZE,
        num_pages=num_pages,
        max_streams=1,
        **VARIANTS[name],
    )
    t0 = time.perf_counter()
    runner = ModelRunner(model, cfg, num_pages)
    print(f"[{name}] runner with graphs built in {time.perf_counter() - t0:.0f} s", flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    runner.kv.data.normal_(generator=gen)  # never time on zeros; the same contents for every variant
    result: dict = {"variant": name, "decode": [], "prefill": None}
    rng = np.random.default_rng(0)
    # One decode step from the fresh pool (the same pages and contents in every variant), to compare logits.
    seqs = [runner.new_sequence() for _ in range(args.profile_batch)]
    for seq in seqs:
        seq.reserve(args.context)
    result["decode_logits"] = runner.decode(seqs, rng.integers(0, 128_000, len(seqs)).tolist()).float().cpu()
    for seq in seqs:
        seq.release()
    for b in batches:
        seqs = [runner.new_sequence() for _ in range(b)]
        for seq in seqs:
            seq.reserve(args.context)
        tokens = rng.integers(0, 128_000, b).tolist()

        step = partial(runner.decode, seqs, tokens)
        ms = median_ms(step, args.repeats)
        row = {"batch": b, "step_ms": ms, "rows_per_s": b / ms * 1e3}
        if b == args.profile_batch:
            row["profile"] = kernel_profile(step, 5)
            print_profile(f"[{name}] decode B={b}", row["profile"])
        result["decode"].append(row)
        for seq in seqs:
            seq.release()
        print(f"[{name}] decode B={b:4d}: {ms:.2f} ms ({b / ms * 1e3:.0f} rows/s)", flush=True)
    # Steady-state prefill: every stream appends a 22-token later-turn prompt (a graphed shape).
    b = args.prefill_batch
    seqs = [runner.new_sequence() for _ in range(b)]
    for seq in seqs:
        seq.reserve(args.context)
    speech = torch.randn(EMBEDDINGS_PER_UNIT, hidden, device="cuda", dtype=model.dtype)
    parts = [(LATER_TURN_PREFIX, speech, LATER_TURN_SUFFIX)] * b  # a later turn's prompt at m=1
    tokens = len(LATER_TURN_PREFIX) + EMBEDDINGS_PER_UNIT + len(LATER_TURN_SUFFIX)

    def prefill():
        for seq in seqs:  # keep the context length fixed: drop what the last call appended
            seq.release()
        seqs[:] = [runner.new_sequence() for _ in range(b)]
        for seq in seqs:
            seq.reserve(args.context)
        return runner.prefill(seqs, parts)

    ms = median_ms(prefill, max(4, args.repeats // 4))
    prof = kernel_profile(prefill, 3)
    print_profile(f"[{name}] prefill {b} x {tokens} tokens", prof)
    result["prefill"] = {"batch": b, "tokens": b * tokens, "step_ms": ms, "tokens_per_s": b * tokens / ms * 1e3}
    result["prefill_profile"] = prof
    print(f"[{name}] prefill {b} x {tokens} tokens: {ms:.2f} ms ({b * tokens / ms * 1e3:.0f} tokens/s)", flush=True)
    for seq in seqs:
        seq.release()
    if args.evict_batch:
        result["evict"] = time_evictions(runner, args)
    runner.graphs = runner.speech_graphs = None  # free the graphs' memory before the next variant
    torch.cuda.empty_cache()
    return result


def time_evictions(runner, args) -> dict:
    """One batched eviction (``compact_many``) of ``--evict-batch`` streams as serving runs it after a step: each
    holds ``--context`` tokens, keeps the 28 system tokens and drops the ``--evict-tokens`` after them (a turn)."""
    b, keep, drop = args.evict_batch, 28, args.evict_tokens
    seqs: list = []

    def evict():
        for seq in seqs:
            seq.release()
        seqs[:] = [runner.new_sequence() for _ in range(b)]
        for seq in seqs:
            seq.reserve(args.context)
        runner.compact_many([(seq, keep, keep + drop) for seq in seqs])

    ms = median_ms(evict, max(4, args.repeats // 2))
    prof = kernel_profile(evict, 3)
    print_profile(f"eviction of {b} streams x {drop} of {args.context} tokens", prof)
    moved = b * (args.context - keep - drop) * runner.kv._token_bytes()
    print(f"eviction: {ms:.2f} ms per call, {ms / b:.3f} ms per stream, {moved / ms / 1e6:.0f} GB/s moved", flush=True)
    for seq in seqs:
        seq.release()
    return {"streams": b, "tokens_dropped": drop, "context": args.context, "ms": ms, "profile": prof}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", default="1,32,64,128,256", help="decode batch sizes (rows)")
    parser.add_argument("--profile-batch", type=int, default=32, help="decode batch whose kernels are listed")
    parser.add_argument("--prefill-batch", type=int, default=16, help="streams in the profiled prefill")
    parser.add_argument("--context", type=int, default=1040, help="cached tokens per row")
    parser.add_argument("--variants", default="reference,fused", help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layers", type=int, default=32, help="LLM layers (fewer: a quicker, partial profile)")
    parser.add_argument("--evict-batch", type=int, default=16, help="streams per timed eviction (0: none)")
    parser.add_argument("--evict-tokens", type=int, default=27, help="tokens each timed eviction drops")
    parser.add_argument("--out", default=None, help="folder for profile_llm.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks.profile_llm needs a CUDA GPU")
    batches = [int(b) for b in args.batch.split(",")]
    if args.profile_batch not in batches:
        batches = sorted(batches + [args.profile_batch])
    model = build_dummy_model(paper_model_config(args.layers))
    info = gpu_info("cuda")
    print(json.dumps(info), flush=True)
    results = [run_variant(model, v, args, batches) for v in args.variants.split(",")]
    base = results[0].get("decode_logits")
    for r in results:
        logits = r.pop("decode_logits", None)
        if base is not None and logits is not None:
            err = ((logits - base).norm(dim=-1) / base.norm(dim=-1)).median().item()
            agree = (logits.argmax(-1) == base.argmax(-1)).float().mean().item()
            r["decode_logits_vs_first_variant"] = {"rel_error_median": err, "argmax_agreement": agree}
            print(
                f"[{r['variant']}] decode logits vs {results[0]['variant']}: rel. error {err:.2e}, argmax {agree:.3f}"
            )
    print("\n| variant | " + " | ".join(f"decode B={b} (ms)" for b in batches) + " | prefill tokens/s |")
    print("|---|" + "---|" * (len(batches) + 1))
    for r in results:
        cells = " | ".join(f"{d['step_ms']:.2f}" for d in r["decode"])
        print(f"| {r['variant']} | {cells} | {r['prefill']['tokens_per_s']:.0f} |")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = {
            "gpu": info,
            "command": "python -m benchmarks.profile_llm " + " ".join(sys.argv[1:]),
            "results": results,
        }
        (out / "profile_llm.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
