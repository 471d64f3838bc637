"""The length adapter (docs/model.md §4): the encoder's 20 ms frames down to the LLM's 80 ms speech embeddings."""

from __future__ import annotations

from torch import Tensor, nn

from infinisst_backend.config import SpeechEncoderConfig
from infinisst_backend.model.speech_encoder import TransposeLast, conv_block


class LengthAdapter(nn.Module):
    """Conv1d(k=2, s=2, no bias) -> LayerNorm over channels -> GELU, per block: [S, T, E] -> [S, T / 2^n, E]."""

    def __init__(self, cfg: SpeechEncoderConfig):
        super().__init__()
        dim = cfg.embed_dim
        self.conv_layers = nn.ModuleList(
            conv_block(
                dim, dim, 2, 2, False, nn.Sequential(TransposeLast(), nn.LayerNorm(dim, eps=1e-5), TransposeLast())
            )
            for _ in range(cfg.adapter_layers)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(1, 2)  # [S, E, T]
        for layer in self.conv_layers:
            x = layer(x)
        return x.transpose(1, 2)
