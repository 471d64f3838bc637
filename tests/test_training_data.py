"""training.data: corpus building and split, eSpeak synthesis and word times, augmentation, utterances, turn targets,
the dataset and its held-out set, the demo sample. Runs on a small corpus built here through the same code."""

import json
import math
import shutil

import numpy as np
import pytest

pytest.importorskip(
    "espeakng_loader", reason="requirements-train.txt is not installed (scripts/setup_training_data.sh)"
)

import torch  # noqa: E402

from tests.support import made_up_sentences, small_corpus_records  # noqa: E402
from training.data import augment as aug  # noqa: E402
from training.data import corpus, speech  # noqa: E402
from training.data.dataset import SpeechDataset, heldout_set  # noqa: E402
from training.data.trajectories import cap_turns, chunk_count, due_words, turn_targets  # noqa: E402
from training.data.utterances import Sentence, Utterance, UtteranceConfig, read_sentences  # noqa: E402

CHUNK_S = 0.96


# --- a small corpus, through corpus.build_records -------------------------------------------------------------------


@pytest.fixture(scope="module")
def records():
    return small_corpus_records(80, 40)


@pytest.fixture(scope="module")
def corpus_file(records, tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl.xz"
    corpus.write_corpus(records, path)
    return path


def test_untag_brown_line():
    line = "``/`` Only/rb a/at handful/nn ''/'' ,/, the/at jury/nn said/vbd (/( 1961/cd )/) --/-- yes/rb ;/. ;/. ./."
    assert corpus.untag_brown_line(line) == '"Only a handful", the jury said (1961) -- yes;.'
    assert corpus.untag_brown_line("   ") is None


def test_read_brown_and_ding(tmp_path):
    (tmp_path / "ca01").write_text(
        "\n\n\tThe/at jury/nn said/vbd it/pps was/bedz fine/jj ./.\n\n\tToo/rb short/jj ./.\n"
        "\n\tThe/at value/nn of/in **zg/nn was/bedz low/jj today/nr ./.\n"
        "\n\tHe/pps paid/vbd $3.50/nns for/in it/ppo ./.\n"
    )
    (tmp_path / "README").write_text("not a corpus file")
    assert list(corpus.read_brown(tmp_path)) == [
        ("brown/ca01/1", "The jury said it was fine."),
        ("brown/ca01/4", "He paid $3.50 for it."),
    ]
    with pytest.raises(ValueError, match="no Brown"):
        list(corpus.read_brown(tmp_path.parent))
    ding = tmp_path / "de-en"
    ding.write_text(
        "# comment\n"
        "Haus {n} | Ich glaube, ich habe mir den Knöchel gebrochen. :: house | I think I\u2019ve broken my ankle.\n"
        "Es geht.; Geht schon. :: It is not too bad at all.; It works.\n"
        "Das ist (sehr) gut. :: That is very good indeed.\n"
        "Gut. :: Good.\n"
    )
    assert list(corpus.read_ding(ding)) == [
        ("ding/2/1", "I think I've broken my ankle.", "Ich glaube, ich habe mir den Knöchel gebrochen."),
        ("ding/3/0", "It is not too bad at all.", "Es geht."),
    ]


def test_split_is_blocks_deterministic_and_large_enough(records):
    held = [r for r in records if r.split == "heldout"]
    assert len(held) >= 10 and {r.source for r in held} == {"brown", "ding"}
    assert all(r.de for r in records if r.source == "ding") and not any(r.de for r in records if r.source == "brown")
    brown = [(f"brown/ca01/{i}", s) for i, s in enumerate(made_up_sentences(80), 1)]
    spanish = lambda xs: [f"es {x.lower()}" for x in xs]  # noqa: E731
    again = corpus.build_records(brown, [], translate=spanish, heldout_fraction=0.2, heldout_min=10)
    ids = {r.id for r in again if r.split == "heldout"}
    assert ids == {r.id for r in corpus.build_records(brown, [], spanish, 0.2, 10) if r.split == "heldout"}
    index = [i for i, r in enumerate(again) if r.split == "heldout"]
    assert len(index) == corpus.HELDOUT_BLOCK and index == list(range(index[0], index[0] + len(index)))
    # At least the minimum, and a corpus-wide fraction.
    assert len(corpus.heldout_ids({"brown": [str(i) for i in range(10000)]}, 0.02, 1500)) >= 1500


def test_corpus_file_round_trip(records, corpus_file):
    assert corpus.load_corpus(corpus_file) == records
    assert all(r.split == "heldout" for r in corpus.load_corpus(corpus_file, "heldout"))
    with pytest.raises(ValueError, match="no corpus file"):
        corpus.load_corpus(corpus_file.parent / "nope.jsonl.xz")


@pytest.mark.skipif(shutil.which("apertium") is None, reason="Debian apertium-eng-spa is not installed")
def test_apertium_translation_through_build_records():
    brown = [("brown/ca01/1", "Good luck in your new job."), ("brown/ca01/2", "The house is very old.")]
    ding = [("ding/1/0", "I think I've broken my ankle.", "Ich glaube, ich habe mir den Knöchel gebrochen.")]
    recs = corpus.build_records(brown, ding, heldout_min=1)
    assert [r.es.split()[0] for r in recs][:2] == ["Suerte", "La"] and "tobillo" in recs[2].es
    assert recs[2].de.startswith("Ich glaube")


# --- speech ----------------------------------------------------------------------------------------------------------


def test_voice_lists_disjoint_and_all_load():
    train, held = speech.voice_names("train"), speech.voice_names("heldout")
    assert not set(train) & set(held) and len(held) >= 8
    for name in train + held:
        assert speech.synthesize("Hi.", speech.Voice(name)).duration_s > 0.05, name
    with pytest.raises(ValueError, match="no voice"):
        speech.synthesize("Hi.", speech.Voice("xx-nowhere"))
    with pytest.raises(ValueError, match="split"):
        speech.voice_names("test")
    with pytest.raises(ValueError, match="empty"):
        speech.synthesize("  ", speech.Voice("en-us"))


@pytest.mark.parametrize("rate", [130, 230])
def test_synthesis_length_and_word_times(rate):
    text = "The jury said it did find that many of the election laws are outmoded or inadequate."
    syn = speech.synthesize(text, speech.Voice("en-us+m3", rate, 50))
    words = text.split()
    nominal = len(words) * 60 / rate
    assert syn.audio.dtype == np.float32 and syn.audio.ndim == 1 and np.isfinite(syn.audio).all()
    assert 0.5 * nominal < syn.duration_s < 1.6 * nominal
    assert len(syn.word_ends) == len(syn.word_starts) == len(words)
    assert all(b >= a for a, b in zip(syn.word_ends, syn.word_ends[1:]))
    assert all(b > a for a, b in zip(syn.word_ends, syn.word_ends[1:]))  # plain words each take time
    assert all(s <= e for s, e in zip(syn.word_starts, syn.word_ends))
    assert 0 < syn.word_ends[0] and syn.word_ends[-1] <= syn.duration_s
    assert syn.duration_s - syn.word_ends[-1] < speech.TAIL_S + 0.02


def test_word_event_mapping():
    text = "In 1961, Mr. Smith -- or not -- paid."
    # (1-based character position, sample): "1961," read as three eSpeak words; "or" has no event of its own; the
    # event at position 25 points at the space before "not" and belongs to "not".
    events = [(1, 0), (4, 100), (5, 200), (5, 300), (10, 400), (14, 500), (20, 600), (25, 700), (30, 800), (33, 900)]
    starts, ends = speech.word_ends_from_events(text, events, 1000)
    assert len(ends) == len(text.split()) == 9
    assert ends == [100, 400, 500, 600, 700, 700, 800, 900, 1000]
    assert starts == [0, 100, 400, 500, 600, 700, 700, 800, 900]
    assert speech.word_ends_from_events("", [], 10) == ([], [])
    assert speech.word_ends_from_events("no events here", [], 50) == ([50, 50, 50], [50, 50, 50])


def test_word_times_with_numbers_and_punctuation():
    text = 'In 1961, Mr. Smith paid $3.50 -- or 12% -- for "no evidence" (really).'
    syn = speech.synthesize(text, speech.Voice("en-us", 175, 50))
    words = text.split()
    assert len(syn.word_ends) == len(words)
    assert all(b >= a for a, b in zip(syn.word_ends, syn.word_ends[1:]))
    durations = dict(zip(words, np.diff([0.0] + syn.word_ends)))
    assert durations["1961,"] > 2 * durations["In"]  # "nineteen sixty-one" is long
    assert syn.word_ends[-1] <= syn.duration_s


def test_synthesis_is_reproducible_after_reset():
    voice = speech.Voice("en-us+f3", 172, 68)
    speech.reset(5)
    a = speech.synthesize("Reproducible speech, please.", voice).audio
    speech.synthesize("Something else in between.", speech.Voice("en+m1", 200, 40))
    speech.reset(5)
    b = speech.synthesize("Reproducible speech, please.", voice).audio
    assert np.array_equal(a, b)


# --- augmentation ----------------------------------------------------------------------------------------------------


def test_augmentation_shapes_finite_and_seeded():
    audio = speech.synthesize("A short test of augmentation.", speech.Voice("en-us")).audio
    everything = aug.AugmentConfig(reverb_p=1.0, noise_p=1.0, pad_p=0.0)
    for pink in (0.0, 1.0):
        out, shift = aug.augment(audio, np.random.default_rng(1), aug.AugmentConfig(reverb_p=1, noise_p=1, pink_p=pink))
        assert out.shape == audio.shape and out.dtype == np.float32 and np.isfinite(out).all() and shift == 0.0
        assert np.abs(out).max() <= 0.99 + 1e-6
    a, _ = aug.augment(audio, np.random.default_rng(7), everything)
    b, _ = aug.augment(audio, np.random.default_rng(7), everything)
    c, _ = aug.augment(audio, np.random.default_rng(8), everything)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    padded, lead = aug.augment(
        audio, np.random.default_rng(3), aug.AugmentConfig(reverb_p=0, noise_p=0, pad_p=1, pad_s=(0.5, 0.5))
    )
    assert lead == 0.5 and len(padded) == len(audio) + 16000 and not padded[:7000].any()
    noisy = aug.add_noise(np.zeros(1000, np.float32), np.random.default_rng(0), 20.0, pink=True)
    assert np.isfinite(noisy).all()
    with pytest.raises(ValueError, match="mono"):
        aug.augment(np.zeros((2, 100), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="probability"):
        aug.AugmentConfig(noise_p=2.0)


# --- turn targets ----------------------------------------------------------------------------------------------------


def _utterance(seconds: float, sentences: list[Sentence]) -> Utterance:
    return Utterance("u", np.zeros(round(seconds * 16000), np.float32), "test", "train", sentences)


def _hand_made() -> Utterance:
    # Leading silence of 2.5 s: chunks 0 and 1 (m=1) hear nothing.
    first = Sentence("one two three four", "uno dos tres cuatro", None, 2.5, 4.0, [2.8, 2.95, 3.5, 4.0])
    second = Sentence("five six", "cinco seis", None, 4.5, 6.0, [5.0, 6.0])
    return _utterance(6.3, [first, second])


def test_english_words_go_to_the_chunk_they_end_in():
    utt = _hand_made()
    turns = turn_targets(utt, "en", 1)
    assert len(turns) == chunk_count(utt, 1) == math.ceil(6.3 / CHUNK_S)
    assert turns == ["", "", "one", "two three", "four", "five", "six"]  # chunk k covers [0.96k, 0.96(k+1))
    assert turn_targets(utt, "en", 2) == ["", "one two three", "four five", "six"]
    # A word ending exactly on a chunk boundary was heard in the chunk that ends there.
    exact = _utterance(2.0, [Sentence("a b", "a b", None, 0.0, 1.92, [0.96, 1.92])])
    assert turn_targets(exact, "en", 1) == ["a", "b", ""]


def test_translation_is_proportional_within_each_sentence():
    utt = _hand_made()
    turns = turn_targets(utt, "es", 1)
    assert " ".join(t for t in turns if t) == utt.text("es")
    assert turns[:2] == ["", ""]  # nothing before the sentence starts
    # Sentence 1 spans chunks 2..4 (2.5 s .. 4.0 s): a quarter of it heard after chunk 2 -> 1 of its 4 words.
    assert turns[2] == "uno" and "cuatro" in turns[4] and "cinco" not in turns[4]
    first_words = [k for k, t in enumerate(turns) for _ in t.split()]
    assert first_words == sorted(first_words)
    with pytest.raises(ValueError, match="no 'de'"):
        turn_targets(utt, "de", 1)
    with pytest.raises(ValueError, match="unsupported language"):
        turn_targets(utt, "fr", 1)


def test_caps_carry_overflow_and_flush_at_the_end():
    due = [["a", "b", "c", "d"], [], ["e"], ["f", "g", "h"]]
    assert cap_turns(due, 2, len) == ["a b", "c d", "e", "f g h"]  # only the last turn may pass the cap
    assert cap_turns([["x"], ["y"]], 1, len) == ["x", "y"]

    class CharTokenizer:  # one token per 3 characters
        def encode(self, text, add_special_tokens=False):
            return list(range(math.ceil(len(text) / 3)))

    utt = _utterance(3.0, [Sentence("Donaudampfschifffahrt is long", "x y z", None, 0.0, 2.9, [1.0, 1.5, 2.9])])
    turns = turn_targets(utt, "en", 1, tokenizer=CharTokenizer(), max_tokens=3)
    assert turns[1] == "Donaudampfschifffahrt"  # a word longer than the cap goes alone
    assert " ".join(t for t in turns if t) == utt.text("en")
    # Default cap with a tokenizer: 10*m - 1 tokens.
    long = _utterance(2.0, [Sentence(" ".join(["word"] * 40), "x", None, 0.0, 1.0, [0.5] * 40)])
    capped = turn_targets(long, "en", 1, tokenizer=CharTokenizer())
    assert all(len(CharTokenizer().encode(t)) <= 9 for t in capped[:-1])
    assert " ".join(t for t in capped if t) == long.text("en")


def test_targets_of_a_synthesised_utterance(records):
    train = [r for r in records if r.split == "train"]
    utt, used = read_sentences(
        train[:6], speech.Voice("en-us", 200, 50), np.random.default_rng(0), UtteranceConfig(max_seconds=12.0)
    )
    assert 1 <= len(utt.sentences) <= used and utt.duration_s <= 12.0
    for s in utt.sentences:
        assert len(s.word_ends) == len(s.en.split()) and s.start_s < s.end_s <= utt.duration_s
    assert all(a.end_s < b.start_s for a, b in zip(utt.sentences, utt.sentences[1:]))
    for language in ("en", "es"):
        for m in (1, 2):
            turns = turn_targets(utt, language, m, max_tokens=10 * m - 1)
            assert len(turns) == math.ceil(len(utt.audio) / (15360 * m))
            assert " ".join(t for t in turns if t) == utt.text(language)
            assert all(t == t.strip() and "  " not in t for t in turns)
            assert turns[0] == "" or utt.sentences[0].word_ends[0] < 0.96 * m
    chunks = due_words(utt, "en", 1)
    for s in utt.sentences:
        for word, end in zip(s.en.split(), s.word_ends):
            k = min(len(chunks) - 1, math.ceil(end / CHUNK_S) - 1)
            assert word in chunks[k]


# --- dataset and held-out set ----------------------------------------------------------------------------------------


def test_train_never_sees_heldout_voices_or_sentences(records):
    held_ids = {r.id for r in records if r.split == "heldout"}
    held_voices = set(speech.voice_names("heldout"))
    ds = SpeechDataset(records, "train", seed=3, max_seconds=8.0, min_seconds=4.0, num_examples=12)
    utts = list(ds)
    assert len(utts) == 12
    for u in utts:
        assert u.split == "train" and u.voice.split("@")[0] not in held_voices
        assert not {s.id for s in u.sentences} & held_ids
        assert np.isfinite(u.audio).all() and u.duration_s <= 8.0 + 2 * 2.0  # augmentation may pad
        assert set(u.languages) >= {"en", "es"}
    assert any("de" in u.languages for u in utts)
    held = heldout_set(records, n=4, max_seconds=8.0, min_seconds=4.0)
    assert len(held) == 4
    for u in held:
        assert u.split == "heldout" and u.voice.split("@")[0] in held_voices
        assert {s.id for s in u.sentences} <= held_ids
    with pytest.raises(ValueError, match="at most"):
        heldout_set(records, n=10_000, max_seconds=8.0, min_seconds=4.0)


def test_determinism_by_seed(records):
    kwargs = dict(max_seconds=6.0, min_seconds=3.0, num_examples=3)
    a = list(SpeechDataset(records, seed=1, **kwargs))
    b = list(SpeechDataset(records, seed=1, **kwargs))
    c = list(SpeechDataset(records, seed=2, **kwargs))
    assert [u.id for u in a] == [u.id for u in b]
    assert all(np.array_equal(x.audio, y.audio) and x.voice == y.voice for x, y in zip(a, b))
    assert [u.voice for u in a] != [u.voice for u in c]
    epoch = SpeechDataset(records, seed=1, **kwargs)
    epoch.set_epoch(1)
    assert [u.voice for u in epoch] != [u.voice for u in a]
    h1 = heldout_set(records, n=2, max_seconds=6.0, min_seconds=3.0)
    h2 = heldout_set(records, n=2, max_seconds=6.0, min_seconds=3.0)
    assert all(np.array_equal(x.audio, y.audio) and x.sentences == y.sentences for x, y in zip(h1, h2))


def test_dataloader_workers_draw_different_streams(corpus_file):
    ds = SpeechDataset(corpus_file, "train", seed=0, max_seconds=5.0, min_seconds=3.0, num_examples=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=list)
    utts = [b[0] for b in loader]
    assert len(utts) == 4 and len({u.id for u in utts}) == 4
    assert len({(u.voice, u.sentences[0].id) for u in utts}) == 4


def test_dataset_rejects_bad_arguments(records):
    with pytest.raises(ValueError, match="split"):
        SpeechDataset(records, "test")
    with pytest.raises(ValueError, match="unsupported languages"):
        SpeechDataset(records, languages=("en", "fr"))
    with pytest.raises(ValueError, match="min_seconds"):
        SpeechDataset(records, max_seconds=5.0, min_seconds=8.0)


# --- the demo sample -------------------------------------------------------------------------------------------------


def test_sample_is_heldout_brown_with_word_times(corpus_file, records, tmp_path):
    soundfile = pytest.importorskip("soundfile")
    from training.data.sample import write_sample

    out = tmp_path / "sample.flac"
    utt = write_sample(out, corpus_file, seconds=6.0)
    audio, rate = soundfile.read(out, dtype="float32")
    assert rate == 16000 and len(audio) == len(utt.audio) and len(audio) <= 6.0 * 16000
    meta = json.loads(out.with_suffix(".json").read_text())
    held_brown = {r.id for r in records if r.split == "heldout" and r.source == "brown"}
    assert {s["id"] for s in meta["sentences"]} <= held_brown
    assert meta["text"] == " ".join(w["word"] for w in meta["words"])
    assert all(set(s) == {"id", "en", "start_s", "end_s"} for s in meta["sentences"])  # no translations
    assert "Der Satz" not in out.with_suffix(".json").read_text()
    with pytest.raises(ValueError, match="FLAC"):
        write_sample(tmp_path / "sample.wav", corpus_file)
