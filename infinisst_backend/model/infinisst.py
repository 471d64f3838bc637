"""InfiniSSTModel: the composite module, speech frontend + LLM, under the released checkpoint key names."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from infinisst_backend.config import ModelConfig
from infinisst_backend.model.llm import LLM
from infinisst_backend.model.speech_frontend import SpeechFrontend

# Speech keys are stored under this prefix in a checkpoint (docs/model.md §1.2); the LLM's keys are stored as is.
SPEECH_PREFIX = "model.speech_encoder."
LM_HEAD_KEY = "lm_head.weight"
# At most this many names per category in a key-mismatch error.
_MAX_LISTED = 20


class InfiniSSTModel(nn.Module):
    """Speech frontend (encoder + length adapter + projection) and the LLM, built from a :class:`ModelConfig`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.llm = LLM(cfg.llm)
        self.speech = SpeechFrontend(cfg.speech_encoder, cfg.llm.hidden_size)

    def checkpoint_state_dict(self) -> dict[str, Tensor]:
        """The state dict under the released key names (docs/model.md §1.2; docs/design.md "Checkpoint directory").

        LLM names as is, speech names prefixed ``model.speech_encoder.``; ``lm_head.weight`` is left out when
        the head is tied to the embeddings. Tensors are the module's own (not copies).
        """
        sd = dict(self.llm.state_dict())
        if self.cfg.llm.tie_word_embeddings:
            sd.pop(LM_HEAD_KEY, None)
        for name, tensor in self.speech.state_dict().items():
            sd[SPEECH_PREFIX + name] = tensor
        return sd

    def load_checkpoint_state_dict(self, sd: Mapping[str, Tensor], strict: bool = True, assign: bool = False) -> None:
        """Load tensors named as in :meth:`checkpoint_state_dict`.

        Raises ``ValueError`` naming every shape mismatch and, when ``strict``, every missing or unexpected
        key. ``assign=True`` makes the module's parameters *be* the given tensors (no copy; their dtype and
        device are kept), which is how a model built without memory is filled.
        """
        self._check_keys(sd, strict)
        llm_sd = {k: v for k, v in sd.items() if not k.startswith(SPEECH_PREFIX)}
        speech_sd = {k[len(SPEECH_PREFIX) :]: v for k, v in sd.items() if k.startswith(SPEECH_PREFIX)}
        if self.cfg.llm.tie_word_embeddings:
            llm_sd.pop(LM_HEAD_KEY, None)  # a tied LLM has no lm_head module: logits use the embeddings
        self.llm.load_state_dict(llm_sd, strict=False, assign=assign)
        self.speech.load_state_dict(speech_sd, strict=False, assign=assign)

    def _check_keys(self, sd: Mapping[str, Tensor], strict: bool) -> None:
        expected = {k: tuple(v.shape) for k, v in self.checkpoint_state_dict().items()}
        given = set(sd)
        if self.cfg.llm.tie_word_embeddings:
            given.discard(LM_HEAD_KEY)  # a redundant copy of the tied head is tolerated
        problems = []
        if strict:
            missing = sorted(set(expected) - given)
            unexpected = sorted(given - set(expected))
            if missing:
                problems.append(f"missing key(s) ({len(missing)}): {_listing(missing)}")
            if unexpected:
                problems.append(f"unexpected key(s) ({len(unexpected)}): {_listing(unexpected)}")
        bad_shapes = [
            f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
            for k in sorted(given & set(expected))
            if tuple(sd[k].shape) != expected[k]
        ]
        if bad_shapes:
            problems.append(f"shape mismatch(es) ({len(bad_shapes)}): {_listing(bad_shapes)}")
        if problems:
            raise ValueError("checkpoint state dict does not match the model: " + "; ".join(problems))

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.llm.model.embed_tokens.weight.device


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")
