"""The benchmarks' model with random (dummy) weights at the paper's dimensions (``infinisst_backend.presets``), and a
synthetic tokenizer with Llama-3.1's vocabulary size and special ids, so that nothing is downloaded."""

from __future__ import annotations

import torch

from infinisst_backend.config import LLMConfig, ModelConfig
from infinisst_backend.model.infinisst import InfiniSSTModel
from infinisst_backend.presets import PAPER_VOCAB_SIZE

PAGE_SIZE = 16  # the engine's KV page, in tokens
# A later turn's prompt around its 12m speech rows (Llama-3.1 ids): <|eot_id|> user header, then assistant header.
LATER_TURN_PREFIX = [128009, 128006, 882, 128007, 271]
LATER_TURN_SUFFIX = [128009, 128006, 78191, 128007, 271]
LLAMA3_SPECIALS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128004: "<|finetune_right_pad_id|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128008: "<|eom_id|>",
    128009: "<|eot_id|>",
}
INFINISST_TOKENS = ["<sp_patch>", "<sp_start>", "<sp_end>", "<latency_1>", "<latency_2>", "<latency_3>", "<latency_4>"]


def synthetic_llama3_tokenizer():
    """A word-level tokenizer with Llama-3.1's vocabulary size and special-token ids (no files needed).

    Words are unknown (id 0) and whitespace is merged into the next word, so a later turn has exactly Llama-3.1's
    ``12m + 10`` tokens; the system prompt is 28 tokens (Llama-3.1's BPE gives about 39). Every id decodes.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = dict(LLAMA3_SPECIALS)
    specials.update({128256 + i: tok for i, tok in enumerate(INFINISST_TOKENS)})
    vocab = {f"w{i}": i for i in range(PAPER_VOCAB_SIZE) if i not in specials and i != 0}
    vocab["<unk>"] = 0
    vocab.update({tok: i for i, tok in specials.items()})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s+"), behavior="merged_with_next")
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(specials.values())})
    return tokenizer


def build_dummy_model(
    cfg: ModelConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> InfiniSSTModel:
    """The model with PyTorch's default random init, built on the device and cast to ``dtype`` (no checkpoint)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = InfiniSSTModel(cfg)
    # RotaryEmbedding is a plain object whose float64 frequencies live on the CPU (its tables are cast per device);
    # the device context above made them on the GPU.
    model.llm.rope.inv_freq = model.llm.rope.inv_freq.cpu()
    return model.to(dtype).eval()


def weights_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def page_bytes(cfg: LLMConfig, itemsize: int = 2, page_size: int = PAGE_SIZE) -> int:
    """Bytes of one KV page of all layers (K and V)."""
    return 2 * cfg.num_hidden_layers * page_size * cfg.num_key_value_heads * cfg.head_dim * itemsize
