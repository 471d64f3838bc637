"""IncrementalDetokenizer on a small byte-level BPE trained offline: multibyte characters are split across tokens."""

from __future__ import annotations

import codecs
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from infinisst_backend.text.detokenizer import IncrementalDetokenizer  # noqa: E402

ALPHABET = list("abcdefgh xyz.,!?") + list("éüßñçà") + list("中文字翻译") + ["😀", "👍", "🎉"] + [" ", " ", "\n"]
SPECIALS = ["<eos>", "<sp_patch>"]


def _corpus() -> list[str]:
    words = ["hallo", "welt", "café", "über", "straße", "niño", "中文", "翻译", "字", "😀", "👍🎉", "façade", "à"]
    lines = []
    for i in range(400):
        picked = [words[(i * 7 + j * 3) % len(words)] for j in range(1 + i % 6)]
        lines.append(" ".join(picked) + ("." if i % 3 else "!"))
    return lines


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # A small vocabulary: some merges join bytes of different characters, many characters stay split into bytes.
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the others are shifted past 255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


@pytest.fixture(scope="module")
def token_bytes(tokenizer) -> dict[int, bytes]:
    """The raw bytes of every token (special tokens decode to nothing)."""
    decoder = _byte_decoder()
    special = set(tokenizer.all_special_ids) | {tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    out = {}
    for token, i in tokenizer.get_vocab().items():
        out[i] = b"" if i in special else bytes(decoder[c] for c in token)
    return out


def _expected(turns: list[list[int]], token_bytes: dict[int, bytes], separator: str) -> str:
    """The specification: each turn's bytes (with the incomplete character carried in from the previous turn)
    decoded and stripped; an incomplete character at the end of a turn carries into the next one."""
    texts = []
    carry = b""
    for ids in turns:
        decoder = codecs.getincrementaldecoder("utf-8")()
        text = decoder.decode(carry + b"".join(token_bytes[i] for i in ids))
        carry = decoder.getstate()[0]
        if text.strip():
            texts.append(text.strip())
    return separator.join(texts)


def test_tokenizer_splits_characters(tokenizer, token_bytes):
    """The fixture does what the property test needs: tokens holding partial characters, also after complete ones."""
    partial = [b for b in token_bytes.values() if b and _is_partial(b)]
    mixed = [b for b in partial if b[0] < 0x80]
    assert len(partial) > 20 and mixed
    ids = tokenizer.encode("字翻 😀🎉é", add_special_tokens=False)
    assert sum(_is_partial(token_bytes[i]) for i in ids) >= 4 and tokenizer.decode(ids) == "字翻 😀🎉é"


def _is_partial(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def _run(detok: IncrementalDetokenizer, turns: list[list[int]], group_sizes: list[int]) -> list[str]:
    deltas = []
    g = 0
    for ids in turns:
        i = 0
        while i < len(ids):
            n = group_sizes[g % len(group_sizes)]
            g += 1
            deltas.append(detok.add(ids[i : i + n]))
            i += n
        deltas.append(detok.end_turn())
    return deltas


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    text=st.text(alphabet=st.sampled_from(ALPHABET), max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=6),
    group_sizes=st.lists(st.integers(min_value=1, max_value=4), min_size=1, max_size=5),
    separator=st.sampled_from([" ", ""]),
    specials=st.lists(st.integers(min_value=0, max_value=60), max_size=2),
)
def test_deltas_concatenate_to_the_joined_turn_texts(
    tokenizer, token_bytes, text, cuts, group_sizes, separator, specials
):
    ids = tokenizer.encode(text, add_special_tokens=False)
    for pos in specials:  # special tokens anywhere, even inside a split character, decode to nothing
        ids.insert(min(pos, len(ids)), tokenizer.convert_tokens_to_ids("<sp_patch>"))
    bounds = sorted({min(c, len(ids)) for c in cuts} | {0, len(ids)})
    turns = [ids[a:b] for a, b in zip(bounds, bounds[1:])] or [[]]
    detok = IncrementalDetokenizer(tokenizer, separator)
    deltas = _run(detok, turns, group_sizes)
    assert "".join(deltas) == _expected(turns, token_bytes, separator)
    assert not any("\ufffd" in d for d in deltas)


def test_split_character_is_carried_into_the_next_turn(tokenizer):
    ids = tokenizer.encode("ab译", add_special_tokens=False)
    cut = next(i for i in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:i]))
    detok = IncrementalDetokenizer(tokenizer, " ")
    first = detok.add(ids[:cut]) + detok.end_turn()
    second = detok.add(ids[cut:]) + detok.end_turn()
    assert (first, second) == ("ab", " 译")


def test_whitespace_is_held_until_more_text_follows(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, " ")
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert detok.add(enc("  hallo")) == "hallo"
    assert detok.add(enc(" ")) == ""
    assert detok.add(enc("welt ")) == " welt"
    assert detok.end_turn() == ""  # the trailing space is dropped
    assert detok.add(enc(" ")) == ""  # a turn of whitespace is empty: no separator
    assert detok.end_turn() == ""
    assert detok.add(enc("中")) == " 中"
    chinese = IncrementalDetokenizer(tokenizer, "")
    assert chinese.add(enc("中文")) + chinese.end_turn() + chinese.add(enc("字")) == "中文字"


def test_real_replacement_characters_pass(tokenizer, token_bytes):
    """U+FFFD that the model generated (the character itself, or invalid bytes) is sent, not held forever."""
    detok = IncrementalDetokenizer(tokenizer, " ")
    ids = tokenizer.encode("a\ufffdb", add_special_tokens=False)
    assert "".join(detok.add([i]) for i in ids) == "a\ufffdb"
    # Lone continuation bytes never complete a character: after a few of them they are sent as U+FFFD.
    continuation = next(i for i, b in token_bytes.items() if b == b"\x80")
    out = "".join(detok.add([continuation]) for _ in range(10))
    assert out.count("\ufffd") >= 5 and set(out) == {"\ufffd"}


def test_non_string_separator_is_rejected(tokenizer):
    with pytest.raises(ValueError, match="separator"):
        IncrementalDetokenizer(tokenizer, None)
