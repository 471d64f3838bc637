"""Convert the released InfiniSST files into a checkpoint directory (docs/real-checkpoints.md).

Inputs (all local; nothing is downloaded):

* the Hugging Face directory of the LLM (``config.json``, ``*.safetensors`` shards, tokenizer files):
  Llama-3.1-8B-Instruct (the paper) or Qwen2.5-7B-Instruct (the ``flashinfer`` branch);
* the fairseq wav2vec 2.0 checkpoint (``wav2vec_vox_960h_pl.pt``): it supplies the encoder's architecture
  (``cfg.model.w2v_args``) and, as a last resort, encoder weights. It is read by a restricted unpickler that
  builds only tensors, containers and inert stand-ins for config objects, and refuses anything else;
* InfiniSST's ``pytorch_model.bin`` (``torch.load(weights_only=True)``): the whole model for the Llama release,
  the speech encoder, adapter and projection for Qwen's stage 1;
* for the Qwen variant, the stage-2 LoRA state dict, merged as ``W + (alpha / r) * B @ A``.

Weights are resolved per key in priority order: LoRA file (its full weights), ``pytorch_model.bin``, the LLM's
safetensors, the wav2vec 2.0 ``.pt``, which is what the reference's sequence of ``load_state_dict`` calls gives.
They are streamed one tensor at a time into ``model.safetensors``, so memory stays at about one tensor whatever
the model size.

Usage: ``python -m infinisst_backend.model.convert OUT_DIR --llm DIR --wav2vec FILE.pt --state-dict FILE.bin
[--lora FILE.bin] [--dtype bfloat16] ...`` (``--help`` lists every option).

Modules, in the order of the data: :mod:`.unpickler` (restricted unpickling) and :mod:`.fairseq` (the wav2vec 2.0
checkpoint), :mod:`.hf_llm` (the LLM directory: config, tokenizer, prompt), :mod:`.sources` (tensors of each input,
LoRA pairs), :mod:`.keys` (key names and patterns), :mod:`.plan` (which source gives each output tensor, and how),
:mod:`.safetensors_file` (the streaming writer), :mod:`.conversion` (one conversion end to end), :mod:`.cli`.
"""

from infinisst_backend.model.convert.cli import main
from infinisst_backend.model.convert.conversion import CONVERSION_FILE, convert
from infinisst_backend.model.convert.fairseq import (
    FairseqCheckpoint,
    parse_conv_layers,
    read_fairseq_checkpoint,
    speech_config,
)
from infinisst_backend.model.convert.hf_llm import (
    INTERPRETER_SYSTEM_TEXT,
    PAPER_SYSTEM_TEXT,
    infinisst_tokens,
    llm_config,
    prepare_tokenizer,
    prompt_config,
    read_hf_config,
)
from infinisst_backend.model.convert.keys import W2V_PREFIX
from infinisst_backend.model.convert.plan import PlannedTensor, materialize, plan_weights, resize_rows
from infinisst_backend.model.convert.safetensors_file import write_safetensors
from infinisst_backend.model.convert.sources import LoRA, TensorSource, hf_weights, open_tensor_file, split_lora
from infinisst_backend.model.convert.unpickler import UnsafePickleError, plain

__all__ = [
    "CONVERSION_FILE",
    "INTERPRETER_SYSTEM_TEXT",
    "PAPER_SYSTEM_TEXT",
    "W2V_PREFIX",
    "FairseqCheckpoint",
    "LoRA",
    "PlannedTensor",
    "TensorSource",
    "UnsafePickleError",
    "convert",
    "hf_weights",
    "infinisst_tokens",
    "llm_config",
    "main",
    "materialize",
    "open_tensor_file",
    "parse_conv_layers",
    "plain",
    "plan_weights",
    "prepare_tokenizer",
    "prompt_config",
    "read_fairseq_checkpoint",
    "read_hf_config",
    "resize_rows",
    "speech_config",
    "split_lora",
    "write_safetensors",
]
