"""The training forward: the project's speech frontend and LLM (frozen, with LoRA), the InfiniSST loss, CTC.

    audio [B, L] --SpeechFrontend.forward_full (chunk mask at m)--> speech rows [B, 12K, H], frames [B, 48K, E]
    frames --ctc_head--> CTC over the English transcript's characters (training only, not exported)
    token embeddings with the speech rows spliced in (training.sequence) --LLM.forward, DenseCausalAttention-->
    hidden [B*T, H] --LLM.logits at the labelled positions--> cross-entropy on each turn's targets and end token

The base LLM (SmolLM2-135M-Instruct, or the tiny preset's seeded random LLM) is rebuilt from ``base_llm_info``
exactly as :func:`infinisst_backend.model.demo.build_trained_demo_checkpoint` rebuilds it, so merging the trained
LoRA there reproduces this model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, SAMPLES_PER_UNIT, TOKENS_PER_UNIT, ModelConfig
from infinisst_backend.model.demo import base_llm
from infinisst_backend.model.llm import LLM
from infinisst_backend.model.speech_frontend import SpeechFrontend
from infinisst_backend.text.prompt import PromptBuilder
from training.attention import DenseCausalAttention
from training.lora import add_lora, lora_modules, peft_state_dict
from training.sequence import CTC_ALPHABET, IGNORE, TrainingBatch

logger = logging.getLogger(__name__)

# Init std of the projection into the LLM's embedding space (see TrainingModel.__init__).
PROJ_INIT_STD = 0.01


@dataclass(slots=True)
class LoRAConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0


@dataclass(slots=True)
class Losses:
    loss: Tensor  # ce + ctc_weight * ctc, for backward
    ce: Tensor
    ctc: Tensor
    num_targets: int


class TrainingModel(nn.Module):
    """Speech frontend (trained from scratch) + frozen LLM with LoRA + auxiliary CTC head.

    Trainable: ``speech.*`` (all of the frontend), the LoRA pairs, ``ctc_head.*``; the LLM's own weights,
    embeddings and head stay frozen.
    """

    def __init__(self, cfg: ModelConfig, llm: LLM, lora: LoRAConfig, ctc_weight: float = 0.5):
        super().__init__()
        if llm.cfg != cfg.llm:
            raise ValueError("the base LLM does not match cfg.llm")
        self.cfg = cfg
        self.lora_cfg = lora
        self.ctc_weight = ctc_weight
        torch_state = torch.random.get_rng_state()
        self.speech = SpeechFrontend(cfg.speech_encoder, cfg.llm.hidden_size)
        # Speech rows start at the token embeddings' scale (SmolLM2's: about 0.14 per dimension), not at nn.Linear's
        # default, which gives rows a few times longer than any token's.
        nn.init.normal_(self.speech.proj.weight, std=PROJ_INIT_STD)
        nn.init.zeros_(self.speech.proj.bias)
        self.ctc_head = nn.Linear(cfg.speech_encoder.embed_dim, len(CTC_ALPHABET) + 1)
        torch.random.set_rng_state(torch_state)
        self.llm = llm
        llm.requires_grad_(False)
        add_lora(llm, lora.rank, lora.alpha, lora.dropout)
        self.attn = DenseCausalAttention()

    # -- what is trained and saved --------------------------------------------------------------------------------

    def trained_state_dict(self) -> dict[str, Tensor]:
        """The frontend's whole state, the LoRA pairs and the CTC head: what a training DIR saves."""
        sd = {f"speech.{k}": v for k, v in self.speech.state_dict().items()}
        for name, module in lora_modules(self.llm).items():
            sd[f"llm.{name}.lora_A.weight"] = module.lora_A.weight
            sd[f"llm.{name}.lora_B.weight"] = module.lora_B.weight
        sd.update({f"ctc_head.{k}": v for k, v in self.ctc_head.state_dict().items()})
        return sd

    @torch.no_grad()
    def load_trained_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Load :meth:`trained_state_dict`'s tensors (all of them: ``ValueError`` naming missing/unexpected keys)."""
        own = self.trained_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"trained weights do not match the model: missing {missing[:5]}, extra {unexpected[:5]}")
        for name, tensor in own.items():
            if tensor.shape != sd[name].shape:
                raise ValueError(f"{name}: saved {tuple(sd[name].shape)}, model {tuple(tensor.shape)}")
            tensor.copy_(sd[name])

    def lora_peft_state_dict(self) -> dict[str, Tensor]:
        """The LoRA pairs under PEFT's names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
        return peft_state_dict(self.llm)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by optimizer group: the frontend (+ CTC head) and the LoRA pairs."""
        lora = [p for m in lora_modules(self.llm).values() for p in (m.lora_A.weight, m.lora_B.weight)]
        speech = [p for p in self.speech.parameters() if p.requires_grad] + list(self.ctc_head.parameters())
        return {"speech": speech, "lora": lora}

    # -- forward --------------------------------------------------------------------------------------------------

    def forward(self, batch: TrainingBatch) -> Losses:
        """The InfiniSST loss of a batch: cross-entropy on the labelled positions, plus the weighted CTC loss."""
        speech, frames = self.speech.forward_full(batch.audio, batch.m, batch.audio_lengths)
        hidden = self._llm_hidden(batch.tokens, batch.speech_rows, speech)  # [B*T, H]
        targets = batch.targets.flatten()
        labelled = targets != IGNORE
        logits = self.llm.logits(hidden[labelled])
        ce = F.cross_entropy(logits, targets[labelled])
        log_probs = self.ctc_head(frames).float().log_softmax(-1).transpose(0, 1)  # [F, B, C]
        ctc = F.ctc_loss(log_probs, batch.ctc_targets, batch.ctc_frames, batch.ctc_lengths, blank=0, zero_infinity=True)
        return Losses(ce + self.ctc_weight * ctc, ce.detach(), ctc.detach(), int(labelled.sum()))

    def _llm_hidden(self, tokens: Tensor, speech_rows: Tensor, speech: Tensor) -> Tensor:
        """Final-norm hidden states ``[B*T, H]`` of token sequences ``[B, T]`` whose speech positions
        (``speech_rows >= 0``) take rows of ``speech [B, R, H]``."""
        batch, length = tokens.shape
        embeds = self.llm.embed(tokens)  # [B, T, H]
        index = speech_rows.clamp(min=0)[..., None].expand(-1, -1, embeds.shape[-1])
        spliced = speech.gather(1, index).to(embeds.dtype)
        embeds = torch.where((speech_rows >= 0)[..., None], spliced, embeds)
        self.attn.plan_lengths([length] * batch)
        positions = torch.arange(length, device=tokens.device).repeat(batch)
        return self.llm(embeds.flatten(0, 1), positions, None, self.attn)

    # -- teacher-free decoding, for logs and tests ----------------------------------------------------------------

    @torch.no_grad()
    def greedy_turns(
        self, audio: np.ndarray | Tensor, language: str, m: int, builder: PromptBuilder, max_chunks: int | None = None
    ) -> list[list[int]]:
        """Each turn's emitted ids with plain greedy decoding (no repetition penalty or n-gram bans), fed back
        as the server feeds them: at most 10*m - 1 per turn, the EOS or the last allowed token never fed.

        The whole sequence is recomputed for every token (slow; logs and tests only)."""
        audio = torch.as_tensor(np.asarray(audio, dtype=np.float32))
        units = -(-audio.numel() // SAMPLES_PER_UNIT)
        speech = self.speech.forward_full(audio[None], m)[0]  # [1, 12U, H]
        tokens: list[int] = []
        rows: list[int] = []
        turns: list[list[int]] = []
        chunks = -(-units // m) if max_chunks is None else min(max_chunks, -(-units // m))
        for j in range(chunks):
            turn = builder.first_turn(language, m) if j == 0 else builder.next_turn(m)
            k = min(m, units - j * m)
            first_row = j * m * EMBEDDINGS_PER_UNIT
            tokens += turn.prefix_ids + [turn.speech_token_id] * (EMBEDDINGS_PER_UNIT * k) + turn.suffix_ids
            rows += [-1] * len(turn.prefix_ids) + list(range(first_row, first_row + EMBEDDINGS_PER_UNIT * k))
            rows += [-1] * len(turn.suffix_ids)
            emitted: list[int] = []
            while True:
                t = torch.tensor([tokens], device=speech.device)
                r = torch.tensor([rows], device=speech.device)
                hidden = self._llm_hidden(t, r, speech)
                token = int(self.llm.logits(hidden[-1:]).argmax(-1))
                if token in builder.eos_ids or len(emitted) + 1 >= TOKENS_PER_UNIT * m:
                    break
                emitted.append(token)
                tokens.append(token)
                rows.append(-1)
            turns.append(emitted)
        return turns


def build_training_model(
    base: dict, lora: LoRAConfig, ctc_weight: float = 0.5, gguf=None
) -> tuple[TrainingModel, object, ModelConfig]:
    """(the training model in float32 on the CPU, its tokenizer, its config) for the base LLM ``base``
    (:func:`infinisst_backend.model.demo.base_llm_info`)."""
    llm, tokenizer, cfg = base_llm(base, gguf)
    model = TrainingModel(cfg, llm, lora, ctc_weight)
    return model, tokenizer, cfg
