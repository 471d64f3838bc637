"""One conversion: open the inputs, derive the model config, plan every tensor, then write the checkpoint
directory (weights streamed, tokenizer, config.json last) and its provenance, and re-read what was written."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from infinisst_backend.config import DTYPES, ModelConfig
from infinisst_backend.model.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_tokenizer,
    load_tokenizer,
    parameters_without_memory,
    read_config,
)
from infinisst_backend.model.convert.fairseq import read_fairseq_checkpoint, speech_config
from infinisst_backend.model.convert.hf_llm import (
    generation_eos_ids,
    llm_config,
    prepare_tokenizer,
    prompt_config,
    read_hf_config,
)
from infinisst_backend.model.convert.keys import (
    ADAPTER_KEY,
    EMBED_KEY,
    ENCODER_PREFIX,
    FREQS_KEY,
    UNUSED_KEY,
    listing,
)
from infinisst_backend.model.convert.plan import PlannedTensor, materialize, plan_weights
from infinisst_backend.model.convert.safetensors_file import write_safetensors
from infinisst_backend.model.convert.sources import (
    DEFAULT_LORA_ALPHA,
    LoRA,
    TensorSource,
    hf_weights,
    open_tensor_file,
    split_lora,
)
from infinisst_backend.model.infinisst import LM_HEAD_KEY, InfiniSSTModel

logger = logging.getLogger(__name__)

CONVERSION_FILE = "conversion.json"  # provenance: inputs, detected variants, dropped keys, added tokens


@dataclass(slots=True)
class _Inputs:
    """The opened inputs of one conversion."""

    hf_config: dict
    tokenizer: object
    tokens: list[str]  # InfiniSST's tokens in the tokenizer
    sources: list[TensorSource]  # priority order
    lora: LoRA
    encoder_args: dict  # the fairseq encoder config
    dropped: list[str]  # keys of InfiniSST's files that the model does not use


def convert(
    out_dir,
    *,
    llm_dir,
    wav2vec,
    state_dict,
    lora=None,
    dtype: str = "bfloat16",
    lora_alpha: float = DEFAULT_LORA_ALPHA,
    speech_rope: str = "auto",
    system_text: str | None = None,
    max_cache_frames: int = 576,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert the released files into a checkpoint directory at ``out_dir``; return its path.

    ``llm_dir``: Hugging Face directory of the LLM; ``wav2vec``: fairseq ``.pt``; ``state_dict``: InfiniSST's
    ``pytorch_model.bin``; ``lora``: the stage-2 LoRA state dict, if any. ``speech_rope`` is "auto"
    (interleaved if the state dict has ``rotary_emb.freqs`` keys, else half), "interleaved" or "half";
    ``system_text`` overrides the family's default prompt text. Raises ``ValueError`` naming every problem
    (unreadable or unsafe file, missing key, shape mismatch) before anything is written.
    """
    out_dir, llm_dir = Path(out_dir), Path(llm_dir)
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype={dtype!r}: expected one of {tuple(DTYPES)}")
    if speech_rope not in ("auto", "interleaved", "half"):
        raise ValueError(f"invalid speech_rope={speech_rope!r}: expected 'auto', 'interleaved' or 'half'")
    if (out_dir / CONFIG_FILE).exists() and not force:
        raise ValueError(f"{out_dir} already holds a checkpoint; pass force=True (--force) to overwrite it")
    lora_path = Path(lora) if lora is not None else None
    with contextlib.ExitStack() as stack:
        inputs = _open_inputs(llm_dir, Path(wav2vec), Path(state_dict), lora_path, lora_alpha, stack)
        cfg = _model_config(inputs, llm_dir, dtype, speech_rope, system_text, max_cache_frames)
        expected = _expected_shapes(cfg)
        plan, problems = plan_weights(expected, inputs.sources, inputs.lora, DTYPES[dtype])
        problems = _unexpected_keys(inputs.sources, expected) + problems
        if problems:
            raise ValueError("cannot convert:\n  " + "\n  ".join(problems))
        check_tokenizer(inputs.tokenizer, cfg, where=f"the tokenizer of {llm_dir}")
        _write(out_dir, cfg, inputs, plan, progress)
        provenance = {"llm_dir": llm_dir, "wav2vec": wav2vec, "state_dict": state_dict, "lora": lora}
        _write_provenance(out_dir, inputs, cfg, {k: v and str(v) for k, v in provenance.items()})
    _verify(out_dir, expected)
    logger.info("wrote %s (%d tensors, %s)", out_dir, len(plan), dtype)
    return out_dir


def _open_inputs(
    llm_dir: Path, wav2vec: Path, state_dict: Path, lora_path: Path | None, alpha: float, stack
) -> _Inputs:
    hf_config = read_hf_config(llm_dir)
    trained: list[TensorSource] = []  # InfiniSST's own files, the later training stage first
    lora = LoRA(alpha=alpha)
    if lora_path is not None:
        lora, full = split_lora(open_tensor_file(lora_path, stack, trained=True), alpha)
        trained.append(full)
    trained.append(open_tensor_file(state_dict, stack, trained=True))
    dropped = []
    for source in trained:  # keys the model does not use are dropped before anything looks at them
        unused = sorted(k for k in source.entries if UNUSED_KEY.search(k))
        if hf_config.get("tie_word_embeddings") and LM_HEAD_KEY in source.entries:
            unused.append(LM_HEAD_KEY)  # a tied head is the embedding matrix
        dropped += [f"{source.label}: {k}" for k in unused]
        for k in unused:
            del source.entries[k]
    rows = next((s.shape(EMBED_KEY)[0] for s in trained if EMBED_KEY in s.entries), None)
    tokenizer, tokens = prepare_tokenizer(llm_dir, hf_config["model_type"], rows)
    if rows is not None and rows != len(tokenizer):
        raise ValueError(f"{EMBED_KEY} has {rows} rows but the tokenizer with InfiniSST's tokens has {len(tokenizer)}")
    fairseq = read_fairseq_checkpoint(wav2vec)
    speech = TensorSource.from_state_dict(wav2vec.name, fairseq.weights, trained=False)
    sources = [*trained, hf_weights(llm_dir, stack), speech.renamed(lambda k: ENCODER_PREFIX + k)]
    return _Inputs(hf_config, tokenizer, tokens, sources, lora, fairseq.encoder_args, dropped)


def _model_config(inputs: _Inputs, llm_dir: Path, dtype: str, speech_rope: str, system_text, max_cache_frames):
    trained_keys = [k for s in inputs.sources if s.trained for k in s.entries]
    has_freqs = any(FREQS_KEY.match(k) for k in trained_keys)
    rope_variant = speech_rope if speech_rope != "auto" else ("interleaved" if has_freqs else "half")
    adapter_ids = {int(m[1]) for k in trained_keys if (m := ADAPTER_KEY.match(k))}
    adapter_layers = max(adapter_ids) + 1 if adapter_ids else 2
    speech = speech_config(inputs.encoder_args, rope_variant, adapter_layers, max_cache_frames)
    llm = llm_config(inputs.hf_config, vocab_size=len(inputs.tokenizer))
    eos_ids = generation_eos_ids(llm_dir)
    num_latency = sum(t.startswith("<latency_") for t in inputs.tokens)
    prompt = prompt_config(llm.architecture, inputs.tokenizer, eos_ids, num_latency, system_text)
    cfg = ModelConfig(speech_encoder=speech, llm=llm, prompt=prompt, dtype=dtype)
    cfg.validate()
    logger.info(
        "%s LLM (vocabulary %d), %d-layer speech encoder with %s RoPE%s",
        llm.architecture,
        llm.vocab_size,
        speech.num_layers,
        rope_variant,
        "" if speech_rope == "auto" else " (forced)",
    )
    return cfg


def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the checkpoint tensors of ``cfg`` (from a model on the meta device: no memory)."""
    try:
        with parameters_without_memory():
            model = InfiniSSTModel(cfg)
    except ValueError as e:
        raise ValueError(f"the inputs describe a model this backend cannot build: {e}") from e
    return {k: tuple(v.shape) for k, v in model.checkpoint_state_dict().items()}


def _unexpected_keys(sources: list[TensorSource], expected: dict) -> list[str]:
    """InfiniSST's own files must hold nothing the model lacks (the reference loads them strictly)."""
    problems = []
    for source in sources:
        extra = sorted(set(source.entries) - set(expected)) if source.trained else []
        if extra:
            problems.append(f"{source.label} has tensor(s) the model does not have: {listing(extra)}")
    return problems


def _write(out_dir: Path, cfg: ModelConfig, inputs: _Inputs, plan: list[PlannedTensor], progress: bool) -> None:
    """Weights and tokenizer first, config.json last: a directory with a config.json is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_FILE).unlink(missing_ok=True)
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    try:
        write_safetensors(tmp, plan, lambda i: materialize(plan[i], inputs.lora), progress)
        tmp.chmod(0o644)
        os.replace(tmp, out_dir / WEIGHTS_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    inputs.tokenizer.save_pretrained(str(out_dir))
    config = {**cfg.to_dict(), "format": FORMAT, "format_version": FORMAT_VERSION}
    tmp = out_dir / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out_dir / CONFIG_FILE)


def _write_provenance(out_dir: Path, inputs: _Inputs, cfg: ModelConfig, paths: dict) -> None:
    record = {
        "inputs": paths,
        "speech_rope": cfg.speech_encoder.rope_variant,
        "lora": {
            "alpha": inputs.lora.alpha,
            "ranks": sorted({a.shape[0] for a, _ in inputs.lora.pairs.values()}),
            "merged_weights": len(inputs.lora.pairs),
        },
        "vocab_size": cfg.llm.vocab_size,
        "infinisst_tokens": dict(zip(inputs.tokens, inputs.tokenizer.convert_tokens_to_ids(inputs.tokens))),
        "dropped_keys": inputs.dropped,
    }
    (out_dir / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _verify(out_dir: Path, expected: dict[str, tuple[int, ...]]) -> None:
    """Re-read what was written: config, tokenizer, tensor names and shapes (no tensor data)."""
    cfg = read_config(out_dir)
    check_tokenizer(load_tokenizer(out_dir), cfg, where=str(out_dir))
    with safe_open(str(out_dir / WEIGHTS_FILE), framework="pt", device="cpu") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if written != expected:
        raise RuntimeError(f"{out_dir / WEIGHTS_FILE} does not hold the planned tensors")
