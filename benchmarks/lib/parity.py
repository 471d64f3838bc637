"""The checks of ``gpu_parity``: the FlashInfer path against the torch path on the same weights and streams
(teacher-forced runners, free-running engines, page leaks); the script's docstring says what each measures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from infinisst_backend.config import (
    DTYPES,
    EMBEDDINGS_PER_UNIT,
    SAMPLES_PER_UNIT,
    DecodingConfig,
    EngineConfig,
    dtype_name,
)
from infinisst_backend.engine.admission import worst_case_pages
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import StreamError, TurnEnded
from infinisst_backend.engine.forced_turns import TurnLengths
from infinisst_backend.engine.stream import eviction_cut
from infinisst_backend.presets import paper_model_config, smoke_model_config
from infinisst_backend.runtime.model_runner import ModelRunner
from infinisst_backend.text.prompt import PromptBuilder

from .models import build_dummy_model, synthetic_llama3_tokenizer

WINDOW = 1000
TEXT_PATH = Path(__file__).resolve().parents[1] / "data" / "parity_text.txt"  # --speech text
TURN_MATCH_REQUIRED = 0.99
FLOOR_FACTOR = 2.0  # FlashInfer may differ from torch at most this many times as much as torch from itself
NEAR_TIE = 0.1  # a reference top-1 - top-2 logit margin below this is a near-tie (bf16 rounding can flip it)
TIE_MARGINS = (0.05, 0.1, 0.2)  # informational turn identity that excuses flips below these margins
SAMPLE_TURNS = 8  # turns of one stream quoted in the report (real model)


@dataclass(frozen=True)
class Target:
    """Where and how the runners run: the GPU (candidate: FlashInfer) or the CPU smoke run (candidate: torch)."""

    device: str
    dtype: str
    window: int
    max_streams: int
    cuda_graphs: bool = True  # the engine's default
    candidate_kv_dtype: str = "auto"  # the candidate's EngineConfig.kv_cache_dtype
    reference_dtype: str | None = None  # the reference runs on a copy of the model in this dtype (None: dtype)

    @property
    def smoke(self) -> bool:
        return self.device == "cpu"

    @property
    def candidate(self) -> str:
        """The backend checked against the torch reference (torch itself in the CPU smoke run)."""
        return "torch" if self.smoke else "flashinfer"

    def config(self, backend: str, num_pages: int, **overrides) -> EngineConfig:
        base = dict(
            device=self.device,
            dtype=self.dtype,
            attention_backend=backend,
            max_batch_size=64,
            page_size=16,
            num_pages=num_pages,
            max_streams=self.max_streams,
            max_llm_cache_tokens=self.window,
            batch_timeout_s=0.0,
            stream_idle_timeout_s=1e9,
        )
        if not self.cuda_graphs:
            base["cuda_graphs"] = False
        if backend == self.candidate and not self.smoke:
            base["kv_cache_dtype"] = self.candidate_kv_dtype
        base.update(overrides)
        return EngineConfig(**base)

    def pages(self, gpu_pages: int, streams: int, beam: int, system_len: int) -> int:
        """KV pages of one pool: the GPU run's fixed count; on the CPU, just what ``streams`` streams can hold."""
        if not self.smoke:
            return gpu_pages
        return streams * worst_case_pages(self.config("torch", 1), 1, beam, system_len) + 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _within_bf16(a: torch.Tensor, b: torch.Tensor) -> tuple[bool, float]:
    """Whether ``a`` equals ``b`` within bf16 rounding: ``|a - b| <= ulp(|b|) + ulp(rms(b))`` element-wise, with
    ulp(x) = 2**-7 * x (bf16 keeps 8 significant bits). Also the largest error in units of that bound."""
    a, b = a.double(), b.double()
    bound = 2.0**-7 * (b.abs() + b.pow(2).mean().sqrt())
    worst = float(((a - b).abs() / bound.clamp_min(1e-30)).max()) if b.numel() else 0.0
    return worst <= 1.0, worst


def top2_margins(logits: torch.Tensor) -> list[float]:
    """Per row, the top-1 minus top-2 logit (how far the greedy choice is from a tie)."""
    top = logits.float().topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


class _Compare:
    """Per-step agreement of one path's logits with the reference's."""

    def __init__(self):
        self.errors: list[float] = []
        self.steps: list[bool] = []
        self.margins: list[float] = []  # the reference's top-1 - top-2 margin per step
        self.turn_ids: list[tuple[int, int]] = []  # per step: (turn, stream)
        self.tags: list[tuple[str, str]] = []  # per step: (prefill or decode, before or after its first eviction)

    def add(self, logits: torch.Tensor, ref: torch.Tensor, margin: float, turn: tuple[int, int], tags: tuple[str, str]):
        self.errors.append(_rel(logits, ref))
        self.turn_ids.append(turn)
        self.tags.append(tags)
        self.steps.append(bool(logits.argmax() == ref.argmax()))
        self.margins.append(margin)

    def _turns_identical(self, tie_margin: float = 0.0) -> list[bool]:
        """Per turn: every step's argmax agrees, or (``tie_margin`` > 0) differs only where the reference's top-2
        margin is below ``tie_margin``."""
        turns: dict[tuple[int, int], bool] = {}
        for turn, same, margin in zip(self.turn_ids, self.steps, self.margins):
            turns[turn] = turns.get(turn, True) and (same or margin < tie_margin)
        return list(turns.values())

    def summary(self) -> dict:
        errors, margins = np.array(self.errors), np.array(self.margins)
        flipped = margins[~np.array(self.steps)]
        turns = self._turns_identical()
        return {
            "turns": len(turns),
            "steps": len(self.steps),
            "turn_identical_fraction": float(np.mean(turns)),
            # informational: a flip at a near-tie says little about the implementation; these fractions excuse the
            # steps whose reference margin is below each value
            "turn_identical_fraction_excusing_ties_below": {
                str(m): float(np.mean(self._turns_identical(m))) for m in TIE_MARGINS
            },
            "step_argmax_agreement": float(np.mean(self.steps)),
            "logits_rel_error_median": float(np.median(errors)),
            "logits_rel_error_p99": float(np.percentile(errors, 99)),
            "logits_rel_error_max": float(errors.max()),
            "ref_top2_margin_median": float(np.median(margins)),
            "ref_top2_margin_p05": float(np.percentile(margins, 5)),
            f"ref_near_tie_fraction (margin < {NEAR_TIE})": float(np.mean(margins < NEAR_TIE)),
            "argmax_flips": int(flipped.size),
            "ref_margin_at_flips_max": float(flipped.max()) if flipped.size else None,
            # where the error comes from: the median over the steps of each kind, and their count
            "logits_rel_error_median_by_step": {
                tag: {"median": float(np.median(errors[mask])), "steps": int(mask.sum())}
                for position, tag in ((0, "prefill"), (0, "decode"), (1, "before_eviction"), (1, "after_eviction"))
                for mask in [np.array([t[position] == tag.split("_")[0] for t in self.tags], dtype=bool)]
                if mask.any()
            },
        }


def text_token_ids(tokenizer) -> list[int]:
    """Token ids of ``benchmarks/data/parity_text.txt`` (an English talk, written for this check)."""
    return tokenizer.encode(TEXT_PATH.read_text().strip(), add_special_tokens=False)


def text_rows(model, ids: list[int], start: int) -> torch.Tensor:
    """The LLM's embeddings ``[12, H]`` of the 12 tokens of ``ids`` from ``start`` on (wrapping around)."""
    chunk = [ids[(start + j) % len(ids)] for j in range(EMBEDDINGS_PER_UNIT)]
    device = model.llm.model.embed_tokens.weight.device
    with torch.inference_mode():
        return model.llm.embed(torch.tensor(chunk, device=device))


def teacher_forced(
    model,
    tokenizer,
    model_cfg,
    target: Target,
    streams: int,
    chunks: int,
    seed: int,
    solo: int,
    speech_source: str,
    ref_model=None,
):
    """Check 1: the candidate runner and the torch runner, both fed the torch path's tokens, turn by turn.

    ``speech_source``: ``noise`` (noise through the speech encoder) or ``text`` (each chunk's 12 speech rows are the
    LLM's own embeddings of the next 12 tokens of an English talk, ``benchmarks/data/parity_text.txt``, each stream
    starting elsewhere in it: what a trained adapter aims at, and inputs with a clear next token).

    The bf16 noise floor: the first ``solo`` streams also run through a third runner (torch attention) one
    sequence at a time. Only the batch composition differs from the reference (so the GEMMs round differently),
    which is how far two correct bf16 implementations drift apart.

    ``ref_model`` (``--reference-dtype``): the reference runs on this copy of the model in a wider dtype, and the
    speech rows it encodes are rounded to the candidate's dtype. The solo runner stays in the candidate's dtype,
    so the "floor" is then the torch path in that dtype against the wide reference: what its rounding alone does.
    """
    ref_model = model if ref_model is None else ref_model
    prompts = PromptBuilder(tokenizer, model_cfg.prompt)
    system_len = prompts.first_turn("German", 1).system_len
    pages = target.pages(4096, streams, 1, system_len)
    ref = ModelRunner(ref_model, target.config("torch", pages, dtype=dtype_name(ref_model.dtype)), pages)
    fi = ModelRunner(model, target.config(target.candidate, pages), pages)
    solo_pages = target.pages(2048, max(1, solo), 1, system_len)
    alone = ModelRunner(model, target.config("torch", solo_pages), solo_pages)
    runners = (ref, fi, alone)
    rng = np.random.default_rng(seed)
    lengths = TurnLengths(seed)
    caches = [ref_model.speech.new_cache(1) for _ in range(streams)]
    seqs = [tuple(r.new_sequence() for r in runners) for _ in range(streams)]
    checkpoints: list[list[int]] = [[] for _ in range(streams)]
    fi_cmp, floor_cmp = _Compare(), _Compare()
    evictions = 0
    evicted = [False] * streams
    layer0_close, layer0_ulps = True, 0.0
    text_ids = text_token_ids(tokenizer) if speech_source == "text" else []
    for k in range(chunks):
        audio = [(0.1 * rng.standard_normal(SAMPLES_PER_UNIT)).astype(np.float32) for _ in range(streams)]
        if speech_source == "text":
            speech = [text_rows(model, text_ids, (i * 61 + k) * EMBEDDINGS_PER_UNIT) for i in range(streams)]
        else:
            speech = ref.encode_speech(caches, audio)  # shared by all paths
        turn = [prompts.first_turn("German", 1) if k == 0 else prompts.next_turn(1) for _ in range(streams)]
        ref_parts = [(p.prefix_ids, emb, p.suffix_ids) for p, emb in zip(turn, speech)]
        parts = [(p.prefix_ids, emb.to(model.dtype), p.suffix_ids) for p, emb in zip(turn, speech)]
        logits_ref = ref.prefill([s[0] for s in seqs], ref_parts)
        logits_fi = fi.prefill([s[1] for s in seqs], parts)
        logits_solo = {i: alone.prefill([seqs[i][2]], [parts[i]])[0] for i in range(solo)}
        if k == 0:
            ref_kv0 = ref.kv.kv_layers[0]  # the candidate's pool may hold CUDA-graph scratch pages after these
            layer0_close, layer0_ulps = _within_bf16(fi.kv.kv_layers[0][: ref_kv0.shape[0]], ref_kv0)
        remaining = [lengths.draw(1, 10) for _ in range(streams)]
        turn_lengths = list(remaining)
        active = list(range(streams))
        while True:
            margins = top2_margins(logits_ref)
            for row, i in enumerate(active):
                tags = ("decode" if remaining[i] < turn_lengths[i] else "prefill", "after" if evicted[i] else "before")
                fi_cmp.add(logits_fi[row], logits_ref[row], margins[row], (k, i), tags)
                if i < solo:
                    floor_cmp.add(logits_solo[i], logits_ref[row], margins[row], (k, i), tags)
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
        for i, triple in enumerate(seqs):
            length = triple[0].num_tokens
            checkpoints[i].append(length)
            cut = eviction_cut(checkpoints[i], length, target.window, system_len)
            if cut is not None:
                for runner, seq in zip(runners, triple):
                    if seq.num_tokens:
                        runner.compact(seq, system_len, cut)
                evictions += 1
                evicted[i] = True
    for triple in seqs:
        for seq in triple:
            seq.release()
    return {
        "streams": streams,
        "evictions": evictions,
        **fi_cmp.summary(),
        "layer0_kv_within_bf16": layer0_close,
        "layer0_kv_max_error_ulps": layer0_ulps,
        "noise_floor": {"streams": solo, **floor_cmp.summary()},
        "pages_leaked": {
            name: r.pool.num_pages - r.pool.num_free
            for name, r in zip(("torch", target.candidate + "_candidate", "torch_solo"), runners)
        },
    }


def run_engine(
    model, tokenizer, model_cfg, target: Target, backend: str, streams: int, seconds: float, beam: int, seed: int
) -> dict:
    """Streams of noise through an engine on the caller's thread; the turn ids per stream and the leak check."""
    system_len = PromptBuilder(tokenizer, model_cfg.prompt).first_turn("German", 1).system_len
    pages = target.pages(8192, streams, beam, system_len)
    engine = Engine(model, tokenizer, model_cfg, target.config(backend, pages, dtype=dtype_name(model.dtype)))
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


def free_running(
    model, tokenizer, model_cfg, target: Target, streams: int, seconds: float, seed: int, ref_model=None
) -> dict:
    """Check 2 and 3: the same streams through a torch engine (on ``ref_model`` when given) and a candidate engine
    (greedy), plus beam 4."""
    ref_model = model if ref_model is None else ref_model
    ref = run_engine(ref_model, tokenizer, model_cfg, target, "torch", streams, seconds, 1, seed)
    fi = run_engine(model, tokenizer, model_cfg, target, target.candidate, streams, seconds, 1, seed)
    beam_streams = max(1, streams // 2)
    beam = run_engine(model, tokenizer, model_cfg, target, target.candidate, beam_streams, seconds / 2, 4, seed)
    same, total, first_diff = 0, 0, {}
    for i in range(streams):
        a, b = ref["turns"][i], fi["turns"][i]
        total += max(len(a), len(b))
        for k, (x, y) in enumerate(zip(a, b)):
            same += x == y
            if x != y and i not in first_diff:
                first_diff[i] = k
    lengths = [len(t) for ts in fi["turns"].values() for t in ts]
    return {
        "streams": streams,
        "turns": total,
        "turn_identical_fraction": same / max(1, total),
        "first_differing_turn": first_diff,
        "turn_tokens_mean": float(np.mean(lengths)) if lengths else 0.0,
        "empty_turn_fraction": float(np.mean([n == 0 for n in lengths])) if lengths else 0.0,
        "errors": ref["errors"] + fi["errors"] + beam["errors"],
        "pages_leaked": {
            "torch": ref["pages_leaked"],
            target.candidate + "_candidate": fi["pages_leaked"],
            "beam4": beam["pages_leaked"],
        },
        "beam4_turns": sum(len(t) for t in beam["turns"].values()),
        # The reference engine's first turns of stream 0, as text (what the real LLM writes for speech rows).
        "sample_turns": [tokenizer.decode(t) for t in ref["turns"].get(0, [])[:SAMPLE_TURNS]],
    }


def default_out(llm: str, smoke: bool) -> str:
    """docs/benchmarks/gpu_parity (real model) or gpu_parity_dummy; build/... for a CPU smoke run."""
    name = "gpu_parity" + ("_dummy" if llm == "dummy" else "")
    return f"build/{name}_cpu_smoke" if smoke else f"docs/benchmarks/{name}"  # never docs/ for a smoke run


def build_model(args, target: Target):
    """(model, tokenizer, model config, description for the report) for ``--llm``."""
    if args.llm == "real":
        from .real_llm import build_real_model  # imports transformers

        real = build_real_model(args.gguf, target.device, DTYPES[target.dtype], seed=args.seed)
        llm = real.info["llm"]
        title = f"{real.info['name']}, real weights"
        text = (
            f"{real.info['name']} with its real weights ({real.info['gguf']}, dequantized, {target.dtype}): "
            f"{llm['layers']} layers, hidden {llm['hidden_size']}, {llm['query_heads']} query / {llm['kv_heads']} "
            f"KV heads, head_dim {llm['head_dim']}, tied embeddings, vocabulary {llm['vocab_size']} (SmolLM2's + "
            f"{llm['added_tokens']} InfiniSST tokens, zero rows); chatml prompt; random speech encoder "
            f"({real.info['speech_encoder']['layers']} layers, {real.info['speech_encoder']['embed_dim']} wide) "
            f"whose projection is shifted and scaled (x{real.info['speech_projection']['scale_k']:.3f}) so speech "
            "rows have the token embeddings' mean and spread"
        )
        return (
            real.model,
            real.tokenizer,
            real.cfg,
            {"title": title, "text": text, "layers": llm["layers"], **real.info},
        )
    if target.smoke:  # the paper's dimensions do not fit a CPU run: the tiny smoke model of the same family
        cfg = smoke_model_config()
        title, text = (
            "tiny random model (CPU smoke)",
            "the tiny smoke model (presets.smoke_model_config: 2 LLM layers), random weights",
        )
    else:
        cfg = paper_model_config(args.layers)
        title = "random paper-dimension model"
        text = (
            f"paper dimensions ({args.layers} LLM layers, Llama-3.1-8B shape, head_dim {cfg.llm.head_dim}; wav2vec "
            f"2.0 Large encoder), random {target.dtype} weights, synthetic Llama-3.1 tokenizer"
        )
    model = build_dummy_model(cfg, target.device, DTYPES[target.dtype], seed=args.seed)
    name = "tiny smoke model" if target.smoke else f"random paper-dimension ({cfg.llm.num_hidden_layers} layers)"
    info = {"title": title, "text": text, "name": name, "layers": cfg.llm.num_hidden_layers}
    return model, synthetic_llama3_tokenizer(), cfg, info
