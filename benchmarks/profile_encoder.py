"""Kernel-by-kernel profile of the streaming speech encoder at the paper's dimensions (GPU).

Builds the wav2vec 2.0 Large frontend with random bf16 weights, brings ``--batch`` streams to the steady state (cache
window full), then times one chunk per stream (eager and, with ``--graphs``, through :class:`EncoderGraphs`) and
prints the CUDA kernels that take the time (torch.profiler), grouped by name:

    python -m benchmarks.profile_encoder --batch 1,8,32 --m 1 --graphs [--modes reference,kv,kernel] [--graph-kernels]

``--modes`` times several ways of computing the attention on the same streams, one after the other: ``kernel``
(the default: :func:`kernels.window_kernel.window_attention` computes each layer's whole chunk attention
in one kernel; serving uses it in the encoder's CUDA graphs only, this script in the eager passes too), ``kv``
(``speech_encoder.WINDOW_ATTENTION`` off: the window kernel builds each layer's keys and values, the reference ops
do the rest), and ``reference`` (``speech_encoder.WINDOW_KERNEL`` off: gather, concatenation and RoPE as separate
ops). (The fused-SDPA experiment of earlier runs is gone from the code; docs/benchmarks/notes.md keeps its figure.)
For each mode it prints whether the embeddings of a steady-state chunk are bit-identical to the first mode's, and the
relative error where they are not.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from benchmarks.lib.gpu import median_time
from benchmarks.lib.kernel_profile import kernel_profile, print_profile
from infinisst_backend.config import SAMPLES_PER_UNIT, SpeechEncoderConfig
from infinisst_backend.model import speech_encoder
from infinisst_backend.model.speech_frontend import SpeechFrontend
from infinisst_backend.runtime.encoder_graphs import EncoderGraphs, encode_chunks

LLM_HIDDEN = 4096  # Llama-3.1-8B


def median_ms(fn, repeats: int = 10) -> float:
    return 1e3 * median_time(fn, repeats, "cuda", warmup=0)


def kernel_table(fn, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--m", type=int, default=1)
    p.add_argument("--graphs", action="store_true", help="also time the CUDA-graph path")
    p.add_argument("--top", type=int, default=18)
    p.add_argument(
        "--graph-kernels", action="store_true", help="list the kernels of the graphed replay (with --graphs)"
    )
    p.add_argument("--modes", default="kernel", help="some of reference, kv, kernel")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = SpeechEncoderConfig()
    frontend = SpeechFrontend(cfg, LLM_HIDDEN).to("cuda", torch.bfloat16).eval()
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, cudnn {torch.backends.cudnn.version()}")
    print(f"encoder params {sum(x.numel() for x in frontend.parameters()) / 1e6:.0f} M, m={args.m}")
    rng = np.random.default_rng(0)
    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ("reference", "kv", "kernel"):
            raise SystemExit(f"unknown mode {mode!r}")
    chunk = torch.from_numpy((0.1 * rng.standard_normal(SAMPLES_PER_UNIT * args.m)).astype("f4")).cuda()
    batches = [int(b) for b in args.batch.split(",")]
    warm = math.ceil(cfg.max_cache_frames / (cfg.block_size * args.m)) + 1
    first_outputs: dict[int, torch.Tensor] = {}
    for mode in modes:
        # graphs capture the attention of the mode they were captured in
        speech_encoder.WINDOW_KERNEL = not mode.startswith("reference")
        speech_encoder.WINDOW_ATTENTION = mode.startswith("kernel")
        print(f"--- attention: {mode}", flush=True)
        pool = frontend.new_pool(max(batches))
        graphs = EncoderGraphs(frontend, pool, max(batches), [args.m]) if args.graphs else None
        # Serving uses the kernel only in graph captures; here the eager passes use it too, to time and check it.
        with torch.inference_mode(), speech_encoder.window_kernel_passes():
            for b in batches:
                caches = [frontend.new_cache(args.m, pool) for _ in range(b)]
                for _ in range(warm):
                    out = frontend.encode_chunks(caches, [chunk] * b)
                out = torch.stack(out)
                if b not in first_outputs:
                    first_outputs[b] = out
                elif torch.equal(out.view(torch.int16), first_outputs[b].view(torch.int16)):
                    print(f"batch {b}: embeddings bit-identical to {modes[0]}'s")
                else:
                    rel = float((out.double() - first_outputs[b].double()).norm() / first_outputs[b].double().norm())
                    print(f"batch {b}: embeddings differ from {modes[0]}'s, relative error {rel:.2e}")

                def eager(caches=caches, b=b):
                    frontend.encode_chunks(caches, [chunk] * b)

                def graphed(caches=caches, b=b, graphs=graphs):
                    encode_chunks(frontend, caches, [chunk] * b, graphs)

                line = f"batch {b}: eager {median_ms(eager):.2f} ms"
                if graphs is not None:
                    line += f", graphed {median_ms(graphed):.2f} ms"
                print(line, flush=True)
                if graphs is not None and args.graph_kernels:
                    print_profile(f"batch {b}: graphed replay", kernel_profile(graphed, 3))
                else:
                    print(kernel_table(eager, args.top), flush=True)
                for c in caches:
                    c.release()
        graphs = pool = None
        torch.cuda.empty_cache()
    speech_encoder.WINDOW_KERNEL, speech_encoder.WINDOW_ATTENTION = True, True


if __name__ == "__main__":
    main()
