"""Decoding: our turn decoders against transformers' generate() on a tiny random float64 Llama.

The reference stack is transformers 4.47; the installed 5.x rewrote beam search. For these tests the two differ in
one rule, the early stop: 4.47 stops once ``beams`` hypotheses are finished and the worst of them is >=
best_candidate / generated_len, where the best candidate is the top one of all max(2, 1 + #EOS) * beams candidates
(possibly an EOS one); 5.x takes the best *running* (non-EOS) beam instead, so it can stop earlier and return
another hypothesis. We implement 4.47: ``_hf47_stopping`` patches 5.x's check to the 4.47 rule, every beam case is
compared with that patched generate(), and ``test_beam_stops_by_the_447_rule`` shows cases where plain 5.x
differs. (5.x also breaks exact score ties differently and, at max length, finishes the top ``beams`` candidates
rather than 4.47's first ``beams`` non-EOS ones; neither changes the best hypothesis unless scores tie exactly.)
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.generation import GenerationMixin  # noqa: E402
from transformers.generation.logits_process import (  # noqa: E402
    EncoderNoRepeatNGramLogitsProcessor,
    LogitsProcessorList,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from infinisst_backend.config import DecodingConfig  # noqa: E402
from infinisst_backend.text.decoding import (  # noqa: E402
    BeamTurn,
    GreedyTurn,
    PartialStepError,
    TurnProcessors,
    TurnResult,
    _Finished,
    apply_processors,
    beam_step,
    greedy_step,
    make_turn_decoder,
)

VOCAB = 48
EOS = (1, 2, 3)  # three EOS ids like Llama-3.1: 16 candidates at beam 4
PAD = 0


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread (and much slower when two CI cores are contended)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=list(EOS),
        pad_token_id=PAD,
    )
    m = LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():
        # Larger weights make the random model confident, so its outputs loop and the n-gram blockers act.
        m.lm_head.weight.mul_(4.0)
        # A small bias on the EOS rows (along the mean hidden direction): some hypotheses finish with an EOS while
        # others run to max length.
        m.lm_head.weight[list(EOS)] += 0.05
    return m


def _logits(model, rows: list[list[int]]) -> torch.Tensor:
    """Last-position logits [rows, V] of full, uncached forwards (all rows have the same length)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows)).logits[:, -1]


def _prompt(seed: int, length: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(4, VOCAB, (length,), generator=g)).tolist()


@contextlib.contextmanager
def _hf47_stopping():
    """Make transformers 5.x's beam search stop by the 4.47 rule (see the module docstring)."""
    top_k = GenerationMixin._get_top_k_continuations
    check = GenerationMixin._check_early_stop_heuristic
    best: dict[str, torch.Tensor] = {}

    def patched_top_k(self, *args, **kwargs):
        out = top_k(self, *args, **kwargs)
        best["candidate"] = out[0][:, :1]  # the best candidate of all, EOS ones included
        return out

    def patched_check(**kwargs):
        kwargs["running_beam_scores"] = best["candidate"]
        return check(**kwargs)

    GenerationMixin._get_top_k_continuations = patched_top_k
    GenerationMixin._check_early_stop_heuristic = staticmethod(patched_check)
    try:
        yield
    finally:
        GenerationMixin._get_top_k_continuations = top_k
        GenerationMixin._check_early_stop_heuristic = staticmethod(check)


def _generate(model, prompt, history, max_new, beams, penalty=1.2, hf47=False) -> list[int]:
    """generate()'s emitted ids: sequence[prompt_len:-1]."""
    processors = LogitsProcessorList([EncoderNoRepeatNGramLogitsProcessor(5, torch.tensor(history, dtype=torch.long))])
    ctx = _hf47_stopping() if hf47 else contextlib.nullcontext()
    with ctx, torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            num_beams=beams,
            do_sample=False,
            max_new_tokens=max_new,
            repetition_penalty=penalty,
            no_repeat_ngram_size=5,
            logits_processor=processors,
            eos_token_id=list(EOS),
            pad_token_id=PAD,
            length_penalty=1.0,
            early_stopping=False,
            num_return_sequences=1,
        )
    return out[0, len(prompt) : -1].tolist()


def _run(model, prompt, history, max_new, beams, dtype=torch.float32, penalty=1.2, ngram=5):
    """Drive our decoder with the model's logits, as the engine would; check the cache bookkeeping.

    Each row is represented by its token sequence, which is exactly what its KV cache holds (every token of a
    row was fed). Returns (result, how the turn ended: "eos" snapshot or "max" row).
    """
    cfg = DecodingConfig(
        beam_size=beams, repetition_penalty=penalty, no_repeat_ngram_size=ngram, encoder_no_repeat_ngram_size=5
    )
    dec = make_turn_decoder(cfg, prompt, history, max_new, EOS)
    rows = [list(prompt)]
    snapshots: list[list[int]] = []
    committed: list[int] = []
    steps = 0
    while True:
        step = dec.step(_logits(model, rows).to(dtype))
        steps += 1
        assert steps <= max_new
        snapshots += [list(rows[r]) for r in step.snapshots]
        committed += step.committed
        if beams == 1:
            assert len(step.committed) == (0 if step.done else 1)  # greedy streams every kept token at once
        elif not step.done:
            assert step.committed == [] and len(step.parents) == beams
        if step.done:
            break
        assert len(step.parents) == len(step.tokens)
        rows = [rows[p] + [t] for p, t in zip(step.parents, step.tokens)]
    res = dec.result()
    assert dec.done and committed == res.emitted_ids
    assert (res.cache_row is None) != (res.cache_snapshot is None)
    cache = rows[res.cache_row] if res.cache_row is not None else snapshots[res.cache_snapshot]
    # Replaying the chosen hypothesis from its cache: the cache holds exactly prompt + emitted ids.
    assert cache == prompt + res.emitted_ids
    assert len(res.emitted_ids) <= max_new - 1
    return res, ("max" if res.cache_row is not None else "eos")


# (prompt seed, prompt length, history kind, max_new_tokens, repetition penalty). The paper's penalty is 1.2; with
# 1.0 the random model loops, which makes the no-repeat 5-gram blocker decide many tokens.
CASES = [
    (1, 9, "none", 12, 1.2),
    (2, 14, "random", 16, 1.2),
    (3, 6, "echo", 20, 1.2),
    (4, 11, "repeat", 16, 1.2),
    (5, 20, "random", 24, 1.2),
    (6, 8, "echo", 10, 1.2),
    (7, 5, "none", 30, 1.2),
    (8, 12, "repeat", 1, 1.2),
    (9, 16, "echo", 8, 1.2),
    (10, 7, "random", 20, 1.2),
    (11, 10, "none", 14, 1.2),
    (12, 13, "echo", 18, 1.2),
    (1, 9, "none", 12, 1.0),
    (3, 6, "echo", 20, 1.0),
    (5, 20, "random", 24, 1.0),
    (7, 5, "repeat", 30, 1.0),
    (10, 7, "random", 20, 1.0),
    (12, 13, "echo", 18, 1.0),
]


def _case(model, seed, length, history_kind, max_new, penalty, beams):
    """(prompt, history) of a case."""
    prompt = _prompt(seed, length)
    if history_kind == "repeat":  # the prompt repeats a 4-gram, so no-repeat 5-gram bans fire from the start
        prompt = prompt + prompt[:4] + prompt[-4:]
    history = []
    if history_kind == "random":
        history = _prompt(seed + 100, 30)
    elif history_kind == "echo":
        # History = what this prompt produces without history: the "encoder" blocker must change the output.
        history = _generate(model, prompt, [], max(max_new, 10), beams, penalty)
    return prompt, history


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_greedy_matches_generate(model, dtype):
    ends = set()
    for seed, length, kind, max_new, penalty in CASES:
        prompt, history = _case(model, seed, length, kind, max_new, penalty, beams=1)
        res, _ = _run(model, prompt, history, max_new, beams=1, dtype=dtype, penalty=penalty)
        expected = _generate(model, prompt, history, max_new, beams=1, penalty=penalty)
        assert res.emitted_ids == expected, (seed, kind, penalty)
        assert res.cache_row == 0
        ends.add("max" if len(expected) == max_new - 1 else "eos")
    assert ends == {"eos", "max"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beam_matches_generate(model, dtype):
    ends = []
    for seed, length, kind, max_new, penalty in CASES:
        prompt, history = _case(model, seed, length, kind, max_new, penalty, beams=4)
        res, end = _run(model, prompt, history, max_new, beams=4, dtype=dtype, penalty=penalty)
        expected = _generate(model, prompt, history, max_new, beams=4, penalty=penalty, hf47=True)
        assert res.emitted_ids == expected, (seed, kind, penalty)
        ends.append((end, len(res.emitted_ids) < max_new - 1))
    # Every way a turn ends: EOS hypothesis chosen after an early stop or at max length (a snapshot), and an
    # open beam at max length (a row).
    assert {("eos", True), ("max", False)} <= set(ends), ends


@pytest.mark.parametrize("seed, length, max_new", [(194, 19, 15), (390, 5, 22)])
def test_beam_stops_by_the_447_rule(model, seed, length, max_new):
    """Cases where transformers 5.x stops earlier than 4.47 (module docstring): we follow 4.47."""
    prompt = _prompt(seed, length)
    res, _ = _run(model, prompt, [], max_new, beams=4, penalty=1.0)
    expected = _generate(model, prompt, [], max_new, beams=4, penalty=1.0, hf47=True)
    assert res.emitted_ids == expected
    assert _generate(model, prompt, [], max_new, beams=4, penalty=1.0) != expected


def test_blockers_change_the_output(model):
    """The cases really exercise the processors: without each of them, some outputs differ."""
    changed = {"history": 0, "ngram": 0, "penalty": 0}
    for seed, length, kind, max_new, penalty in CASES:
        for beams in (1, 4):
            prompt, history = _case(model, seed, length, kind, max_new, penalty, beams)
            args = (model, prompt, history, max_new, beams)
            full = _run(*args, penalty=penalty)[0].emitted_ids
            changed["history"] += full != _run(model, prompt, [], max_new, beams, penalty=penalty)[0].emitted_ids
            changed["ngram"] += full != _run(*args, penalty=penalty, ngram=0)[0].emitted_ids
            if penalty != 1.0:
                changed["penalty"] += full != _run(*args, penalty=1.0)[0].emitted_ids
    assert all(v >= 3 for v in changed.values()), changed


def test_beam_differs_from_greedy(model):
    outputs = [
        (
            _run(model, *_case(model, s, n, k, m, p, 1), m, beams=1, penalty=p)[0].emitted_ids,
            _run(model, *_case(model, s, n, k, m, p, 4), m, beams=4, penalty=p)[0].emitted_ids,
        )
        for s, n, k, m, p in CASES
    ]
    assert any(g != b for g, b in outputs)


def test_processors_match_transformers():
    """Repetition penalty, no-repeat 5-gram and encoder no-repeat 5-gram, row by row, against transformers."""
    g = torch.Generator().manual_seed(7)
    vocab = 40
    prompt = torch.randint(0, 12, (30,), generator=g).tolist()
    prompt += prompt[3:7]  # a repeated 4-gram: the prompt itself bans a token
    history = torch.randint(0, 12, (150,), generator=g).tolist()
    cfg = DecodingConfig(beam_size=4, ngram_lookback=100)
    proc = TurnProcessors(cfg, prompt, history)
    banned_total = 0
    groups = (
        [[]],  # the prompt ends with a repeated 4-gram
        [[5, 6, 7, 8], prompt[10:14], prompt[20:24]],  # the last two end with a 4-gram of the prompt
        [prompt[3:8] + [1, 2], history[60:67], [9] * 7],  # history 5-gram / the row's own 5-gram
    )
    for rows_generated in groups:
        hyps = []
        for tokens in rows_generated:
            hyp = proc.root()
            for t in tokens:
                proc.append(hyp, t)
            hyps.append(hyp)
        seqs = torch.tensor([prompt + h.tokens for h in hyps])
        scores = torch.randn(len(hyps), vocab, generator=g, dtype=torch.float64)
        scores[:, ::3] = scores[:, ::3].abs()  # positive scores take the /penalty branch
        ours = scores.clone()
        apply_processors(
            ours, [proc.penalty] * len(hyps), [proc.penalized(h) for h in hyps], [proc.banned(h) for h in hyps]
        )
        ref = RepetitionPenaltyLogitsProcessor(1.2)(seqs, scores.clone())
        ref = NoRepeatNGramLogitsProcessor(5)(seqs, ref)
        ref = EncoderNoRepeatNGramLogitsProcessor(5, torch.tensor(history[-100:]))(seqs, ref)
        assert torch.equal(ours, ref)
        banned_total += int(torch.isinf(ours).sum())
    assert banned_total >= 5


def test_per_row_penalties_in_one_batch():
    """greedy_step over streams with different penalties equals stepping each stream alone."""
    torch.manual_seed(3)
    prompts = [_prompt(20 + i, 6 + i) for i in range(4)]
    penalties = [1.0, 1.2, 1.5, 1.2]
    logits = torch.randn(4, VOCAB, dtype=torch.float64) * 3
    for i, p in enumerate(prompts):
        logits[i, p[0]] = 5.0  # the penalty decides between this prompt id and the runner-up
    logits[:, 4] = 4.5

    def turns():
        return [
            make_turn_decoder(DecodingConfig(repetition_penalty=pen), p, [], 10, EOS)
            for p, pen in zip(prompts, penalties)
        ]

    batched = greedy_step(turns(), logits)
    alone = [t.step(logits[i : i + 1]) for i, t in enumerate(turns())]
    assert batched == alone
    assert len({s.tokens[0] for s in batched}) > 1


def test_bad_calls():
    cfg = DecodingConfig(beam_size=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        make_turn_decoder(cfg, [5, 6], [], 0, EOS)
    with pytest.raises(ValueError, match="eos_ids"):
        make_turn_decoder(cfg, [5, 6], [], 4, [])
    with pytest.raises(ValueError, match="beam_size"):
        make_turn_decoder(DecodingConfig(beam_size=0), [5, 6], [], 4, EOS)
    dec = make_turn_decoder(cfg, [5, 6], [], 1, EOS)
    assert isinstance(dec, BeamTurn)
    with pytest.raises(RuntimeError):
        dec.result()
    with pytest.raises(ValueError, match="shape"):
        dec.step(torch.zeros(2, VOCAB))
    step = dec.step(torch.zeros(1, VOCAB))  # max_new_tokens=1: the only token is never emitted
    assert step.done and dec.result().emitted_ids == [] and dec.result().cache_row == 0
    with pytest.raises(RuntimeError):
        dec.step(torch.zeros(4, VOCAB))
    greedy = make_turn_decoder(DecodingConfig(), [5, 6], [], 3, EOS)
    assert isinstance(greedy, GreedyTurn)
    logits = torch.zeros(1, VOCAB)
    logits[0, 2] = 1.0  # EOS first: an empty turn
    step = greedy.step(logits)
    assert step.done and step.committed == [] and greedy.done
    assert greedy.result().emitted_ids == [] and greedy.result().cache_row == 0


def _row(vocab: int, probs: dict[int, float]) -> torch.Tensor:
    """Logits [1, vocab] whose softmax gives ``probs``; the rest of the mass spreads almost evenly (no ties)."""
    rest = [t for t in range(vocab) if t not in probs]
    weights = torch.tensor([1.0 - 0.02 * i for i in range(len(rest))], dtype=torch.float64)
    p = torch.zeros(vocab, dtype=torch.float64)
    p[rest] = weights / weights.sum() * (1.0 - sum(probs.values()))
    for t, q in probs.items():
        p[t] = q
    return p.log()[None]


def _synthetic_beam(max_new: int) -> BeamTurn:
    # 2 beams, 2 EOS ids: 6 candidates. No processors, so the scores are exactly the given log-probs.
    cfg = DecodingConfig(beam_size=2, repetition_penalty=1.0, no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0)
    dec = make_turn_decoder(cfg, [15, 14], [], max_new, [1, 2])
    assert isinstance(dec, BeamTurn)
    return dec


def test_beam_skips_eos_candidates_ranked_below_the_beams():
    """An EOS candidate ranked >= beams is not a hypothesis, so it cannot fill the set and stop the search early."""
    dec = _synthetic_beam(max_new=3)
    # Candidates: 5 (beam), EOS 1 (rank 1: finished, -1.20), EOS 2 (rank 2: skipped, -1.61), 6 (beam).
    step = dec.step(_row(16, {5: 0.4, 1: 0.3, 2: 0.2, 6: 0.05}))
    assert step.parents == [0, 0] and step.tokens == [5, 6] and step.snapshots == [0]
    # Best candidate (5, 7): (-0.92 - 2.41) / 2 = -1.66 <= -1.61: had EOS 2 been kept, 2 finished hypotheses
    # would end the search here.
    step = dec.step(torch.cat([_row(16, {7: 0.09, 1: 0.001, 2: 0.001}), _row(16, {1: 0.001, 2: 0.001})]))
    assert not step.done and step.tokens[0] == 7 and step.parents[0] == 0
    # (5, 7, EOS 1): (-3.33 - 0.11) / 3 = -1.15 beats the first hypothesis (-1.20).
    step = dec.step(torch.cat([_row(16, {1: 0.9}), _row(16, {})]))
    assert step.done and step.snapshots == [0] and step.committed == [5, 7]
    assert dec.result() == TurnResult([5, 7], None, 1)


def test_beam_tie_goes_to_the_later_hypothesis():
    """Equal scores: 4.47 sorts the hypotheses stably and takes the last one."""
    dec = _synthetic_beam(max_new=2)
    step = dec.step(_row(16, {5: 0.4, 6: 0.4}))  # two beams with the same cumulative score
    assert sorted(step.tokens) == [5, 6]
    tokens = step.tokens
    same = _row(16, {1: 0.9})
    step = dec.step(torch.cat([same, same]))  # both finish with the same score, then max length
    assert step.done and step.snapshots == [0, 1]
    res = dec.result()
    assert res.cache_snapshot == 1 and res.emitted_ids == [tokens[1]]


def test_finished_set_keeps_the_best():
    """4.47 BeamHypotheses: at most ``beams`` hypotheses; the worst score is tracked after a removal."""
    dec = _synthetic_beam(max_new=5)
    kept = [dec._add(_Finished(score, [], None, None)) for score in (-1.0, -2.0, -3.0, -0.5, -1.0, -0.9)]
    assert kept == [True, True, False, True, False, True]
    assert [h.score for h in dec._finished] == [-0.5, -0.9]


def test_beam_step_over_many_streams_equals_each_alone():
    """beam_step over streams of beam widths 2, 3 and 4, other penalties, prompts and histories, each joining at its
    own step (so first steps and later ones share a batch), chooses what each stream's own step() chooses, step
    after step to the end of every turn (EOS finishes, n-gram bans, max length)."""
    g = torch.Generator().manual_seed(11)
    specs = [(2, 1.0, 6), (4, 1.2, 7), (3, 1.5, 5), (4, 1.2, 8), (2, 1.3, 4)]

    def turns():
        return [
            make_turn_decoder(
                DecodingConfig(beam_size=b, repetition_penalty=pen), _prompt(40 + i, 9), _prompt(60 + i, 30), n, EOS
            )
            for i, (b, pen, n) in enumerate(specs)
        ]

    batched, alone = turns(), turns()
    rows = [1] * len(specs)
    steps = 0
    while any(not t.done for t in batched):
        live = [i for i, t in enumerate(batched) if not t.done and i <= steps]  # stream i joins at step i
        blocks = []
        for i in live:
            block = torch.randn(rows[i], VOCAB, generator=g, dtype=torch.float64) * 2
            block[:, list(EOS)] -= 1.5 - 0.25 * steps  # EOS grows likelier as the turns go on
            blocks.append(block)
        together = beam_step([batched[i] for i in live], torch.cat(blocks))
        for i, block, got in zip(live, blocks, together):
            assert got == alone[i].step(block), (i, steps)
            rows[i] = len(got.parents)
        steps += 1
    assert [t.result() for t in batched] == [t.result() for t in alone]
    assert any(t.result().cache_snapshot is not None for t in batched)  # some turn ended on an EOS hypothesis
    with pytest.raises(ValueError, match="shape"):
        beam_step(turns()[:2], torch.zeros(3, VOCAB))


def test_a_turn_failing_in_a_batched_step_fails_alone(monkeypatch):
    """A turn that fails while the batch's turns walk their candidates does not stop the others: PartialStepError
    carries the others' steps (what each chooses alone) and the failure; a single turn's failure is raised as is."""
    cfgs = [DecodingConfig(beam_size=2, repetition_penalty=p) for p in (1.2, 1.31, 1.5)]
    prompts = [_prompt(80 + i, 8) for i in range(3)]
    real = BeamTurn._select

    def select(self, *args):
        if self.processors.penalty == 1.31:
            raise RuntimeError("injected")
        return real(self, *args)

    def turns():
        return [make_turn_decoder(c, p, [], 6, EOS) for c, p in zip(cfgs, prompts)]

    logits = torch.randn(3, VOCAB, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    alone = [t.step(logits[i : i + 1]) for i, t in enumerate(turns())]
    monkeypatch.setattr(BeamTurn, "_select", select)
    with pytest.raises(PartialStepError) as caught:
        beam_step(turns(), logits)
    assert caught.value.steps[0] == alone[0] and caught.value.steps[2] == alone[2]
    assert caught.value.steps[1] is None and str(caught.value.failures[1]) == "injected"
    with pytest.raises(RuntimeError, match="injected"):
        turns()[1].step(logits[1:2])
