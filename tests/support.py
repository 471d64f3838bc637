"""Tiny models, audio and engine helpers shared by the engine tests."""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

from infinisst_backend.config import SAMPLE_RATE, DecodingConfig, EngineConfig
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import RequestDone, StreamError, StreamFinished, TextDelta, TurnEnded
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.presets import tiny_model_config
from infinisst_backend.text.tokenizers import add_infinisst_tokens, smollm2_tokenizer


@functools.lru_cache(maxsize=2)
def tokenizer_for(template: str):
    tokenizer = smollm2_tokenizer()
    add_infinisst_tokens(tokenizer, template)
    return tokenizer


def build_tiny_model(template: str = "chatml", dtype=torch.float64, seed: int = 0, eos_boost: float = 3.0):
    """(model, tokenizer, model_cfg): seeded random weights; EOS rows boosted so turns vary in length."""
    tokenizer = tokenizer_for(template)
    cfg = tiny_model_config(template, "qwen2" if template == "chatml" else "llama", vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = InfiniSSTModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".2.1.weight" in name or "layer_norm.weight" in name:
                p.fill_(1.0)
            elif "rotary_emb" not in name:
                p.normal_(0.0, 0.2 if p.ndim > 1 else 0.02)
        lm_head = model.llm.lm_head.weight
        for token in cfg.prompt.eos_tokens:
            lm_head[tokenizer.convert_tokens_to_ids(token)] *= eos_boost
    return model.to(dtype).eval(), tokenizer, cfg


def engine_config(**overrides) -> EngineConfig:
    base = dict(
        dtype="float64",
        max_batch_size=8,
        max_prefill_tokens=512,
        page_size=4,
        num_pages=4096,
        max_streams=64,
        max_llm_cache_tokens=160,
        batch_timeout_s=0.0,
        default_language="German",
    )
    base.update(overrides)
    return EngineConfig(**base)


def make_engine(model_bundle, **overrides) -> Engine:
    model, tokenizer, cfg = model_bundle
    return Engine(model, tokenizer, cfg, engine_config(**overrides))


def random_audio(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """Speech-like noise: amplitude-modulated tones plus noise, float32 in [-1, 1]."""
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    freq = rng.uniform(100, 400)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t)
    signal = 0.3 * envelope * np.sin(2 * np.pi * freq * t) + 0.05 * rng.standard_normal(n)
    return np.clip(signal, -1, 1).astype(np.float32)


def split_randomly(rng: np.random.Generator, audio: np.ndarray, max_piece: int = 40_000) -> list[np.ndarray]:
    pieces, start = [], 0
    while start < audio.size:
        n = int(rng.integers(1, max_piece))
        pieces.append(audio[start : start + n])
        start += n
    return pieces


def collect(events, stream_id) -> dict:
    """Per-stream view of engine events: turn ids, text, done tags, errors, finish reason."""
    out = {"turns": [], "text": "", "done": [], "errors": [], "finished": None}
    for e in events:
        if e.stream_id != stream_id:
            continue
        if isinstance(e, TurnEnded):
            out["turns"].append(list(e.token_ids))
        elif isinstance(e, TextDelta):
            out["text"] += e.text
        elif isinstance(e, RequestDone):
            out["done"].append(e.tag)
        elif isinstance(e, StreamError):
            out["errors"].append((e.tag, e.code, e.message))
        elif isinstance(e, StreamFinished):
            out["finished"] = e.reason
    return out


def run_alone(model_bundle, audio: np.ndarray, language: str, m: int, decoding: DecodingConfig, **overrides) -> dict:
    engine = make_engine(model_bundle, **overrides)
    engine.open_stream("solo", language, m, decoding)
    engine.add_audio("solo", audio, tag=0, end=True)
    engine.run_until_idle()
    return collect(engine.events, "solo")


# ---------------------------------------------------------------------------------------------- training data


def made_up_sentences(n: int, offset: int = 0) -> list[str]:
    """``n`` distinct English sentences (a corpus for the training-data tests; not Brown, not Ding)."""
    subjects = ["The old farmer", "A young teacher", "My brother", "The small dog", "Our neighbour", "The pilot"]
    verbs = ["painted", "carried", "found", "watched", "repaired", "described"]
    objects = ["the red barn", "a heavy box", "the broken clock", "three letters", "the garden gate", "a blue boat"]
    combos = list(itertools.product(subjects, verbs, objects))
    return [f"{s} {v} {o} on day {offset + i}." for i, (s, v, o) in enumerate(combos[offset : offset + n])]


def small_corpus_records(brown: int, ding: int):
    """A small corpus through ``training.data.corpus.build_records``: ``brown`` made-up sentences, ``ding`` made-up
    pairs with German, a fake Spanish translation instead of Apertium, a 20% held-out split."""
    from training.data import corpus

    brown_lines = [(f"brown/ca01/{i}", s) for i, s in enumerate(made_up_sentences(brown), 1)]
    pairs = [
        (f"ding/{i}/0", s, f"Der Satz Nummer {i} auf Deutsch.") for i, s in enumerate(made_up_sentences(ding, brown))
    ]
    return corpus.build_records(
        brown_lines,
        pairs,
        translate=lambda xs: [f"es {x.lower()}" for x in xs],
        heldout_fraction=0.2,
        heldout_min=10,
    )
