"""Key names: ours (the released InfiniSST names, docs/model.md §1.2) and the prefixes and patterns of the
release files' keys, which the converter maps to ours."""

from __future__ import annotations

import re

from infinisst_backend.model.infinisst import LM_HEAD_KEY, SPEECH_PREFIX

EMBED_KEY = "model.embed_tokens.weight"
VOCAB_KEYS = (EMBED_KEY, LM_HEAD_KEY)
ENCODER_PREFIX = SPEECH_PREFIX + "speech_encoder."  # our names of fairseq's Wav2Vec2Model
W2V_PREFIX = "w2v_encoder.w2v_model."  # the same module inside a fine-tuned fairseq checkpoint
LORA_PREFIX = "base_model.model."  # PEFT wraps the model: base_model (LoraModel) . model (the LLM)

# Keys of InfiniSST's state dict that our model does not use (docs/model.md §1.2): the pretraining mask embedding,
# the convolutional positional embedding that RoPE replaced, HF rotary buffers (derived from the config).
UNUSED_KEY = re.compile(
    r"^model\.speech_encoder\.speech_encoder\.(mask_emb|encoder\.pos_conv\..*)$|\.rotary_emb\.inv_freq$"
)
FREQS_KEY = re.compile(r"^model\.speech_encoder\.speech_encoder\.encoder\.layers\.\d+\.self_attn\.rotary_emb\.freqs$")
ADAPTER_KEY = re.compile(r"^model\.speech_encoder\.length_shrink\.conv_layers\.(\d+)\.")
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


def listing(names: list[str], limit: int = 20) -> str:
    """Names for a message: the first ``limit``, then how many more."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
