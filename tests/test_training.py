"""The training side of the trained demo model (training/), on the tiny preset with random weights.

The sequence a training example feeds matches the server's turns (PromptBuilder) and labels exactly each turn's
target ids and end token; the batched differentiable frontend pass equals the offline reference per utterance; the
loss goes down; resume continues the run; export -> build -> load_checkpoint gives the merged model, whose
streaming engine decodes what the training model decodes.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from infinisst_backend.config import SAMPLES_PER_UNIT, DecodingConfig
from infinisst_backend.engine.engine import Engine
from infinisst_backend.engine.events import TurnEnded
from infinisst_backend.model.checkpoint import load_checkpoint
from infinisst_backend.model.demo import base_llm, base_llm_info, build_trained_demo_checkpoint, read_shipped_file
from infinisst_backend.model.speech_frontend import SpeechFrontend
from infinisst_backend.presets import trained_demo_model_config
from infinisst_backend.text.detokenizer import IncrementalDetokenizer
from infinisst_backend.text.prompt import PromptBuilder
from tests.support import engine_config
from training import checkpoint
from training.export import export
from training.fake_data import FakeDataset, make_utterance
from training.fake_data import turn_targets as fake_turn_targets
from training.lora import merged_state_dict
from training.model import LoRAConfig, TrainingModel
from training.sequence import IGNORE, build_example, collate
from training.train import Trainer, parse_args

TEXTS = ["Hello world.", "", "how are you", "I am fine, thanks!"]


def fixed_targets(utt, language, m, tokenizer=None, max_tokens=None):
    return list(TEXTS)


@pytest.fixture(scope="module")
def base():
    """(tokenizer, cfg, builder) of the tiny preset."""
    llm, tokenizer, cfg = base_llm(base_llm_info(tiny=True))
    return tokenizer, cfg, PromptBuilder(tokenizer, cfg.prompt)


def tiny_model(seed: int = 0, lora_scale: float = 0.0) -> TrainingModel:
    llm, _, cfg = base_llm(base_llm_info(tiny=True))
    torch.manual_seed(seed)
    model = TrainingModel(cfg, llm, LoRAConfig(rank=4, alpha=8.0))
    if lora_scale:
        with torch.no_grad():
            for p in model.parameter_groups()["lora"]:
                p.normal_(0.0, lora_scale)
    return model


def utterance(seconds: float, index: int = 0):
    return make_utterance(np.random.default_rng(index), index, seconds)


def test_sequence_is_the_servers_turns_and_labels_are_the_targets(base):
    tokenizer, cfg, builder = base
    m = 1
    utt = utterance(3.2)  # 4 units: 3 full chunks and a partial one (0.32 s -> 1 unit too, k = 1 at m = 1)
    ex = build_example(utt, "es", m, builder, tokenizer, fixed_targets)
    first, later = builder.first_turn("es", m), builder.next_turn(m)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected_tokens, expected_targets, pos = [], [], 0
    for j, text in enumerate(TEXTS):
        prompt = (first if j == 0 else later).input_ids()
        ids = tokenizer.encode(text, add_special_tokens=False) if text else []
        assert ex.turn_targets[j] == ids
        expected_tokens += prompt + ids
        expected_targets += [IGNORE] * (len(prompt) - 1) + ids + [end_id]
        pos += len(prompt) + len(ids)
    assert ex.tokens == expected_tokens + [end_id]
    assert ex.targets == expected_targets + [IGNORE]
    # The later turns' prompts open with the end token the previous turn predicted.
    assert later.prefix_ids[0] == end_id
    # Speech rows: 12 per unit, in order, at the placeholders.
    placeholders = [i for i, t in enumerate(ex.tokens) if t == builder.speech_token_id]
    assert [ex.speech_rows[i] for i in placeholders] == list(range(12 * 4))
    assert all(r == -1 for i, r in enumerate(ex.speech_rows) if i not in set(placeholders))
    # What the detokenizer makes of the target ids is the turns' texts joined by one space.
    detok = IncrementalDetokenizer(tokenizer, " ")
    text = "".join(detok.add(ids) + detok.end_turn() for ids in ex.turn_targets)
    assert text == " ".join(t for t in TEXTS if t)
    assert not tokenizer.decode(ex.turn_targets[2]).startswith(" ")


def test_partial_chunks_and_the_token_cap(base):
    tokenizer, cfg, builder = base
    utt = utterance(2.5)  # 3 units; m = 2: a full chunk, then a partial one of 1 unit
    ex = build_example(utt, "en", 2, builder, tokenizer, fixed_targets)
    assert ex.units == 3 and len(ex.turn_targets) == 2
    assert sum(r >= 0 for r in ex.speech_rows) == 36
    capped = build_example(utterance(20.0), "en", 1, builder, tokenizer, fake_turn_targets, max_tokens=200)
    assert len(capped.tokens) <= 200
    assert len(capped.audio) == len(capped.turn_targets) * SAMPLES_PER_UNIT


def test_forward_full_batch_equals_encode_full_per_utterance():
    cfg = trained_demo_model_config(64, tiny=True).speech_encoder
    cfg.max_cache_frames = 100  # the window matters within these lengths
    torch.manual_seed(0)
    frontend = SpeechFrontend(cfg, 24).double().eval()
    rng = np.random.default_rng(0)
    lengths = [SAMPLES_PER_UNIT * 3 + 500, SAMPLES_PER_UNIT * 5, 7000]
    audio = torch.from_numpy(rng.standard_normal((3, max(lengths))) * 0.1)
    for i, n in enumerate(lengths):
        audio[i, n:] = 3.0  # garbage after each stream: it must not reach the stream's own units
    for m in (1, 2):
        with torch.no_grad():
            embeds, frames = frontend.forward_full(audio, m, lengths)
        assert embeds.shape[:2] == (3, 12 * 5) and frames.shape[:2] == (3, 48 * 5)
        for i, n in enumerate(lengths):
            alone = frontend.encode_full(audio[i, :n], m)
            torch.testing.assert_close(embeds[i, : alone.shape[0]], alone, rtol=0, atol=1e-10)


def test_loss_decreases_on_a_fixed_batch(base):
    tokenizer, cfg, builder = base
    model = tiny_model()
    examples = [build_example(utterance(2.0 + i, i), "en", 1, builder, tokenizer, fake_turn_targets) for i in range(2)]
    batch = collate(examples, pad_id=builder.next_turn(1).prefix_ids[0])
    groups = model.parameter_groups()
    optimizer = torch.optim.AdamW([{"params": groups["speech"]}, {"params": groups["lora"]}], lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
    assert out.num_targets == batch.num_targets > 0
    assert losses[-1] < 0.8 * losses[0], losses


def test_merged_lora_gives_the_lora_models_outputs(base):
    tokenizer, cfg, builder = base
    model = tiny_model(lora_scale=0.05).double().eval()
    ex = build_example(utterance(2.0), "de", 1, builder, tokenizer, fake_turn_targets)
    batch = collate([ex], pad_id=0)
    speech = model.speech.forward_full(batch.audio.double(), 1)[0]
    with torch.no_grad():
        hidden = model._llm_hidden(batch.tokens, batch.speech_rows, speech)
        lora_logits = model.llm.logits(hidden)
        merged_llm, _, _ = base_llm(base_llm_info(tiny=True))
        merged_llm.load_state_dict(merged_state_dict(model.llm))
        model.llm = merged_llm.double()
        merged_logits = model.llm.logits(model._llm_hidden(batch.tokens, batch.speech_rows, speech))
    assert not torch.equal(
        merged_llm.model.layers[0].self_attn.q_proj.weight,
        base_llm(base_llm_info(True))[0].model.layers[0].self_attn.q_proj.weight.double(),
    )
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-6, atol=1e-6)


def train_args(out, steps: int, **extra) -> argparse.Namespace:
    argv = ["--out", str(out), "--steps", str(steps), "--tiny", "--fake-data", "--device", "cpu", "--batch", "2"]
    argv += ["--workers", "0", "--warmup", "2", "--log-every", "1", "--decode-every", "0", "--save-every", "0"]
    argv += ["--data-args", '{"size": 8, "max_seconds": 3.0}']
    for key, value in extra.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return parse_args(argv)


def test_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    first = Trainer(train_args(out, 3))
    assert first.run() == 3
    saved = {k: v.detach().clone() for k, v in first.model.trained_state_dict().items()}
    state, tensors = checkpoint.load_run(out)
    assert state["step"] == 3 and set(tensors) == set(saved)
    assert all(torch.equal(tensors[k], saved[k]) for k in saved)
    assert [r["step"] for r in checkpoint.read_log(out)] == [1, 2, 3]

    second = Trainer(train_args(out, 5))
    assert second.step == 3 and second.resumed_at is None  # optimizer.pt was there
    assert all(torch.equal(v, saved[k]) for k, v in second.model.trained_state_dict().items())
    assert second.run() == 5
    assert checkpoint.load_run(out)[0]["step"] == 5

    (out / checkpoint.OPTIMIZER_FILE).unlink()
    third = Trainer(train_args(out, 6))
    assert third.step == 5 and third.resumed_at == 5  # fresh optimizer, re-warm-up
    assert third.run() == 6


def test_export_build_load_round_trip(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(train_args(out, 2))
    trainer.run()
    with torch.no_grad():  # a LoRA that matters
        for p in trainer.model.parameter_groups()["lora"]:
            p.normal_(0.0, 0.05)
    trainer.save()
    shipped = export(out, tmp_path / "demo.safetensors", dtype="float32")
    tensors, meta = read_shipped_file(shipped)
    assert meta["lora"]["rank"] == 8 and meta["step"] == "2" and meta["base_llm"]["name"] == "random"
    assert any(k.startswith("base_model.model.model.layers.0.self_attn.q_proj.lora_A") for k in tensors)
    assert not any("ctc_head" in k for k in tensors)

    built = build_trained_demo_checkpoint(shipped, tmp_path / "ckpt")
    model, tokenizer, cfg = load_checkpoint(built)
    merged = merged_state_dict(trainer.model.llm)
    for key, value in model.llm.state_dict().items():
        torch.testing.assert_close(value, merged[key].float(), rtol=0, atol=0)
    for key, value in model.speech.state_dict().items():
        assert torch.equal(value, trainer.model.speech.state_dict()[key])
    assert build_trained_demo_checkpoint(shipped, built) == built  # up to date: skipped

    # The served streaming path decodes the first chunk as the training model does (plain greedy, float64).
    audio = make_utterance(np.random.default_rng(5), 5, 1.5).audio
    training_model = trainer.model.double().eval()
    expected = training_model.greedy_turns(audio, "en", 1, trainer.builder, max_chunks=1)[0]
    engine = Engine(model.double(), tokenizer, cfg, engine_config(default_language="English"))
    plain = DecodingConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0)
    engine.open_stream("s", "en", 1, plain)
    engine.add_audio("s", audio[:SAMPLES_PER_UNIT], tag=0, end=True)
    engine.run_until_idle()
    turns = [list(e.token_ids) for e in engine.events if isinstance(e, TurnEnded)]
    assert turns[0] == expected


def test_fake_dataset_follows_the_contract():
    data = FakeDataset(size=3, max_seconds=2.0)
    utt = data[0]
    assert utt.audio.dtype == np.float32 and utt.sentences[0].de
    texts = fake_turn_targets(utt, "en", 1)
    assert len(texts) == -(-len(utt.audio) // SAMPLES_PER_UNIT)
    assert " ".join(t for t in texts if t) == utt.sentences[0].en


def test_length_buckets_batch_similar_lengths_and_lose_nothing():
    """A DataLoader over LengthBuckets (2 workers) yields every utterance once, each batch sorted-adjacent: its
    lengths are consecutive in the pool's sorted order, so a batch spans far less than the whole range."""
    from training.train import LengthBuckets

    class Lengths(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            order = np.random.default_rng(info.id if info else 0).permutation(64)
            for n in (int(k) + 1 for k in order):  # each worker: 64 utterances of 1..64 samples, shuffled
                yield SimpleNamespace(audio=np.zeros(n, np.float32), id=(info.id if info else 0, n))

    def spans(dataset) -> list[int]:
        batches = list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=list))
        ids = [u.id for b in batches for u in b]
        assert len(ids) == 128 and len(set(ids)) == 128
        return [max(len(u.audio) for u in b) - min(len(u.audio) for u in b) for b in batches]

    # A pool holds 32 of a worker's 64 lengths, about 2 apart once sorted: a batch of 4 spans ~6, against ~38 for 4
    # lengths drawn at random from 1..64.
    assert np.mean(spans(LengthBuckets(Lengths(), batch=4, pool=8, seed=0))) < 10
    assert np.mean(spans(Lengths())) > 25
