"""The command line: ``python -m infinisst_backend.model.convert OUT_DIR --llm DIR --wav2vec FILE.pt
--state-dict FILE.bin [--lora FILE.bin] [--dtype bfloat16] ...`` (``--help`` lists every option)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from infinisst_backend.config import DTYPES
from infinisst_backend.model.convert.conversion import convert
from infinisst_backend.model.convert.sources import DEFAULT_LORA_ALPHA


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m infinisst_backend.model.convert",
        description="Convert the released InfiniSST files into a checkpoint directory (docs/real-checkpoints.md).",
    )
    parser.add_argument("out_dir", type=Path, help="the checkpoint directory to write")
    parser.add_argument("--llm", required=True, type=Path, help="Hugging Face directory of Llama-3.1 / Qwen2.5")
    parser.add_argument("--wav2vec", required=True, type=Path, help="fairseq wav2vec 2.0 checkpoint (.pt)")
    parser.add_argument("--state-dict", required=True, type=Path, help="InfiniSST's pytorch_model.bin (stage 1)")
    parser.add_argument("--lora", type=Path, help="stage-2 LoRA state dict (Qwen2.5 variant)")
    parser.add_argument("--lora-alpha", type=float, default=DEFAULT_LORA_ALPHA, help="LoRA alpha (default 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES), help="storage dtype (default bfloat16)")
    parser.add_argument(
        "--speech-rope",
        default="auto",
        choices=("auto", "interleaved", "half"),
        help="speech-encoder RoPE (auto: interleaved if the state dict has rotary_emb.freqs keys, else half)",
    )
    parser.add_argument("--system-text", help="system prompt text with {language} (and {latency}) fields")
    parser.add_argument("--max-cache-frames", type=int, default=576, help="speech encoder window (default 576)")
    parser.add_argument("--force", action="store_true", help="overwrite OUT_DIR if it holds a checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        convert(
            args.out_dir,
            llm_dir=args.llm,
            wav2vec=args.wav2vec,
            state_dict=args.state_dict,
            lora=args.lora,
            dtype=args.dtype,
            lora_alpha=args.lora_alpha,
            speech_rope=args.speech_rope,
            system_text=args.system_text,
            max_cache_frames=args.max_cache_frames,
            force=args.force,
            progress=not args.no_progress,
        )
    except ValueError as e:
        parser.exit(1, f"error: {e}\n")
