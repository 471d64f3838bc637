"""The parts of ``gpu_streams``' report: decode step and prefill vs batch size, the speech encoder's chunk time and
cache bytes, and the naive baseline (one stream at a time through HF transformers)."""

from __future__ import annotations

import gc
import inspect
import math
import time

import numpy as np
import torch

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, SAMPLES_PER_UNIT
from infinisst_backend.engine.forced_turns import TOKENS_PER_UNIT_MEAN
from infinisst_backend.runtime.model_runner import ModelRunner

from .gpu import median_time, sync
from .models import LATER_TURN_PREFIX, LATER_TURN_SUFFIX, PAGE_SIZE
from .trials import SETTINGS, Bench


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def measure_parts(bench: Bench, batch_sizes: list[int], context: int) -> dict:
    """Decode step time vs batch size and prefill throughput of the runner (FlashInfer), ``context``-token caches."""
    cfg = bench.engine_config(SETTINGS["greedy_m1"], max(batch_sizes), 1)
    pages_per_seq = math.ceil((context + 200) / PAGE_SIZE)  # room for the timed decode and prefill calls
    cfg.num_pages = max(batch_sizes) * pages_per_seq + 8
    cfg.max_streams = 1  # no streams here: no speech cache slots
    runner = ModelRunner(bench.model, cfg, cfg.num_pages)
    runner.kv.data.normal_()  # never time on zeros
    hidden = bench.model_cfg.llm.hidden_size
    rng = np.random.default_rng(0)
    decode, prefill = [], []
    for b in batch_sizes:
        seqs = [runner.new_sequence() for _ in range(b)]
        for seq in seqs:
            seq.reserve(context)
        tokens = rng.integers(0, 128_000, b).tolist()
        t = median_time(lambda seqs=seqs, tokens=tokens, r=runner: r.decode(seqs, tokens), 8, bench.device)
        decode.append({"batch": b, "step_ms": 1e3 * t, "rows_per_s": b / t})
        # A later turn's prompt at m=1: 5 ids, 12 speech rows, 5 ids = 22 tokens per stream.
        speech = torch.randn(EMBEDDINGS_PER_UNIT, hidden, device=bench.device, dtype=bench.model.dtype)
        parts = [(LATER_TURN_PREFIX, speech, LATER_TURN_SUFFIX)] * b
        t = median_time(lambda seqs=seqs, parts=parts, r=runner: r.prefill(seqs, parts), 4, bench.device)
        prefill.append({"batch": b, "tokens": 22 * b, "step_ms": 1e3 * t, "tokens_per_s": 22 * b / t})
        for seq in seqs:
            seq.release()
        print(f"  parts B={b:4d}: decode {decode[-1]['step_ms']:.1f} ms, prefill {prefill[-1]['step_ms']:.1f} ms")
    del runner
    _free(bench.device)
    return {"context_tokens": context, "decode": decode, "prefill": prefill}


def measure_encoder(bench: Bench, batch_sizes: list[int], m: int) -> dict:
    """Speech-encoder time per batched chunk at steady state (576-frame cache full), and the cache's bytes."""
    speech = bench.model.speech
    out = []
    chunk = torch.from_numpy((0.1 * np.random.default_rng(1).standard_normal(SAMPLES_PER_UNIT * m)).astype("f4"))
    cache_bytes = 0
    for b in batch_sizes:
        pool = speech.new_pool(b)  # freed after this batch size (the frontend's default pool would keep growing)
        caches = [speech.new_cache(m, pool) for _ in range(b)]
        warm_chunks = math.ceil(speech.cfg.max_cache_frames / (speech.cfg.block_size * m)) + 1
        for _ in range(warm_chunks):
            speech.encode_chunks(caches, [chunk.to(bench.device)] * b)
        cache_bytes = caches[0].nbytes()
        t = median_time(
            lambda caches=caches, b=b: speech.encode_chunks(caches, [chunk.to(bench.device)] * b), 3, bench.device
        )
        out.append({"batch": b, "ms": 1e3 * t})
        del caches, pool
    _free(bench.device)
    return {"m": m, "steady_state_cache_bytes": cache_bytes, "times": out}


def measure_naive(bench: Bench, encoder_ms_b1: dict[int, float], context: int) -> dict:
    """One stream, unbatched: HF transformers Llama with a contiguous DynamicCache of ``context`` tokens.

    A turn = speech encoder (batch 1) + prefill of the turn prompt (12m + 10 tokens) + (mean forced length - 1)
    decode steps with an argmax read back per step; beam 4 runs 4 rows, as the reference does (docs/model.md §6.2).
    naive N* = floor(chunk period / turn time): workers share the GPU one turn at a time.
    """
    import transformers

    llm_cfg = bench.model_cfg.llm
    hf_cfg = transformers.LlamaConfig(**llm_cfg.to_hf_dict(), attn_implementation="sdpa")
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    weights = bench.model.llm.state_dict()
    weights["lm_head.weight"] = weights["lm_head.weight"][: llm_cfg.vocab_size]  # the GPU runner pads the rows
    hf.load_state_dict(weights, strict=True, assign=True)  # shares our weights
    rotary = type(hf.model.rotary_emb)(config=hf_cfg)
    hf.model.rotary_emb = rotary.to(bench.device)
    hf.eval()
    cache_arg = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    hidden = llm_cfg.hidden_size
    out = {}
    for setting in (s for s in SETTINGS.values() if s.m in encoder_ms_b1):
        rows = setting.beam
        q = EMBEDDINGS_PER_UNIT * setting.m + 10
        steps = round(TOKENS_PER_UNIT_MEAN * setting.m - 1)  # decode steps of a mean-length turn

        def turn(rows=rows, q=q, steps=steps, hf=hf):
            ctx = torch.randn(rows, context, hidden, device=bench.device, dtype=bench.model.dtype)
            cache = transformers.DynamicCache(config=hf_cfg)
            with torch.inference_mode():
                hf(inputs_embeds=ctx, use_cache=True, logits_to_keep=1, **{cache_arg: cache})
                sync(bench.device)
                t = time.perf_counter()
                x = torch.randn(rows, q, hidden, device=bench.device, dtype=bench.model.dtype)
                logits = hf(inputs_embeds=x, use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits
                token = logits[:, -1].argmax(-1)
                token.tolist()
                prefill_t = time.perf_counter() - t
                for _ in range(steps):
                    logits = hf(input_ids=token[:, None], use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits
                    token = logits[:, -1].argmax(-1)
                    token.tolist()  # generate() reads every step's token on the host
                return prefill_t, time.perf_counter() - t

        turn()
        runs = [turn() for _ in range(5)]
        prefill_s = float(np.median([r[0] for r in runs]))
        llm_s = float(np.median([r[1] for r in runs]))
        turn_s = llm_s + encoder_ms_b1[setting.m] / 1e3
        out[setting.name] = {
            "rows": rows,
            "prompt_tokens": q,
            "decode_steps": steps,
            "prefill_ms": 1e3 * prefill_s,
            "llm_turn_ms": 1e3 * llm_s,
            "encoder_ms": encoder_ms_b1[setting.m],
            "turn_ms": 1e3 * turn_s,
            "naive_n_star": int(setting.period_s // turn_s),
        }
        print(f"  naive {setting.name}: turn {1e3 * turn_s:.1f} ms -> {out[setting.name]['naive_n_star']} streams")
    del hf
    _free(bench.device)
    return out
