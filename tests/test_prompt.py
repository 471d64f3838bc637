"""PromptBuilder: token layouts of both templates (docs/model.md §5.1-§5.3, §7.4), EOS set, languages, m."""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from infinisst_backend.config import PromptConfig  # noqa: E402
from infinisst_backend.errors import InvalidArgument  # noqa: E402
from infinisst_backend.presets import INTERPRETER_SYSTEM_TEXT, chatml_prompt  # noqa: E402
from infinisst_backend.text.prompt import LLAMA3_DATE_TEXT, PromptBuilder, TurnPrompt  # noqa: E402
from infinisst_backend.text.tokenizers import (  # noqa: E402
    INFINISST_TOKENS,
    LLAMA3_SPECIAL_TOKENS,
    add_infinisst_tokens,
    smollm2_tokenizer,
)


@pytest.fixture(scope="module")
def llama3_tok():
    tok = smollm2_tokenizer()
    add_infinisst_tokens(tok, "llama3")
    return tok


@pytest.fixture(scope="module")
def chatml_tok():
    tok = smollm2_tokenizer()
    add_infinisst_tokens(tok, "chatml")
    return tok


def ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_added_tokens_follow_the_papers_order(llama3_tok, chatml_tok):
    base = len(smollm2_tokenizer())
    expected = list(LLAMA3_SPECIAL_TOKENS + INFINISST_TOKENS)
    assert ids(llama3_tok, *expected) == list(range(base, base + len(expected)))
    # chatml: SmolLM2 already has the chatml tokens; only InfiniSST's are appended.
    assert ids(chatml_tok, *INFINISST_TOKENS) == list(range(base, base + len(INFINISST_TOKENS)))
    assert add_infinisst_tokens(chatml_tok, "chatml") == []  # idempotent


@pytest.mark.parametrize("m", [1, 2, 4])
def test_llama3_first_turn(llama3_tok, m):
    tok = llama3_tok
    pb = PromptBuilder(tok, PromptConfig())
    turn = pb.first_turn("de", m)
    bos, sh, eh, eot, patch = ids(
        tok, "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<sp_patch>"
    )
    latency = tok.convert_tokens_to_ids(f"<latency_{m}>")
    text = "\n\n" + LLAMA3_DATE_TEXT + "Translate the following speech from English to German with latency"
    system = [bos, sh, *enc(tok, "system"), eh, *enc(tok, text), *enc(tok, " "), latency, *enc(tok, "."), eot]
    user = [sh, *enc(tok, "user"), eh, *enc(tok, "\n\n")]
    suffix = [eot, sh, *enc(tok, "assistant"), eh, *enc(tok, "\n\n")]
    assert turn.system_len == len(system)
    assert turn.prefix_ids == system + user
    assert turn.num_speech == 12 * m
    assert turn.suffix_ids == suffix
    assert turn.input_ids() == system + user + [patch] * (12 * m) + suffix
    assert turn.num_tokens == len(turn.input_ids())
    # The space before the latency token is its own token, as in the reference (id 220 there).
    assert turn.input_ids()[turn.system_len - 4 : turn.system_len - 2] == [*enc(tok, " "), latency]
    # Same as tokenizing the rendered Llama-3.1 template string, special tokens and all.
    rendered = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>" + text + f" <latency_{m}>.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n" + "<sp_patch>" * (12 * m) + "<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert turn.input_ids() == enc(tok, rendered)
    assert pb.eos_ids == frozenset(ids(tok, "<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"))
    assert pb.speech_token_id == patch


@pytest.mark.parametrize("m", [1, 3])
def test_llama3_later_turn(llama3_tok, m):
    tok = llama3_tok
    pb = PromptBuilder(tok, PromptConfig())
    turn = pb.next_turn(m)
    sh, eh, eot, patch = ids(tok, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<sp_patch>")
    prefix = [eot, sh, *enc(tok, "user"), eh, *enc(tok, "\n\n")]
    suffix = [eot, sh, *enc(tok, "assistant"), eh, *enc(tok, "\n\n")]
    assert (turn.prefix_ids, turn.num_speech, turn.suffix_ids, turn.system_len) == (prefix, 12 * m, suffix, 0)
    assert turn.input_ids() == prefix + [patch] * (12 * m) + suffix
    # SmolLM2 splits "assistant" into two tokens; with Llama-3's single-token roles this is 12m + 10 (below).
    extra = len(enc(tok, "user")) + len(enc(tok, "assistant")) - 2
    assert turn.num_tokens == 12 * m + 10 + extra


def llama3_shaped_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer where roles and "\\n\\n" are single tokens, as in Llama-3's vocabulary."""
    vocab = {"<unk>": 0, "system": 1, "user": 2, "assistant": 3, "\n\n": 4}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")))
    add_infinisst_tokens(tok, "llama3")
    return tok


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_llama3_later_turn_matches_reference_layout(m):
    """Model doc §5.3: [eot, sh, user, eh, \\n\\n] <sp_patch>*12m [eot, sh, assistant, eh, \\n\\n] = 12m + 10."""
    tok = llama3_shaped_tokenizer()
    turn = PromptBuilder(tok, PromptConfig()).next_turn(m)
    sh, eh, eot, patch = ids(tok, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<sp_patch>")
    expected = [eot, sh, 2, eh, 4] + [patch] * (12 * m) + [eot, sh, 3, eh, 4]
    assert turn.input_ids() == expected
    assert turn.num_tokens == 12 * m + 10


@pytest.mark.parametrize("m", [1, 2])
def test_chatml_first_and_later_turns(chatml_tok, m):
    tok = chatml_tok
    pb = PromptBuilder(tok, chatml_prompt())
    ims, ime, patch = ids(tok, "<|im_start|>", "<|im_end|>", "<sp_patch>")
    text = INTERPRETER_SYSTEM_TEXT.format(language="Spanish")
    system = [ims, *enc(tok, "system\n" + text), ime, *enc(tok, "\n")]
    user = [ims, *enc(tok, "user\n")]
    suffix = [ime, *enc(tok, "\n"), ims, *enc(tok, "assistant\n")]

    first = pb.first_turn("es", m)
    assert first.system_len == len(system)
    assert (first.prefix_ids, first.num_speech, first.suffix_ids) == (system + user, 12 * m, suffix)
    rendered = (
        f"<|im_start|>system\n{text}<|im_end|>\n<|im_start|>user\n"
        + "<sp_patch>" * (12 * m)
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first.input_ids() == enc(tok, rendered)

    later = pb.next_turn(m)
    assert later.prefix_ids == [ime, *enc(tok, "\n"), *user]  # closes the previous assistant turn
    assert later.suffix_ids == suffix and later.system_len == 0
    assert later.input_ids() == [ime, *enc(tok, "\n"), *user, *[patch] * (12 * m), *suffix]
    assert pb.eos_ids == frozenset(ids(tok, "<|im_end|>", "<|endoftext|>"))


def test_system_prompt_depends_on_language_and_latency(llama3_tok):
    pb = PromptBuilder(llama3_tok, PromptConfig())
    de1, de2, zh1 = pb.first_turn("de", 1), pb.first_turn("de", 2), pb.first_turn("zh", 1)
    assert de1.system_len == de2.system_len == pb.system_len("German", 1)
    assert de1.prefix_ids[: de1.system_len] != de2.prefix_ids[: de2.system_len]  # <latency_1> vs <latency_2>
    assert "Chinese" in llama3_tok.decode(zh1.prefix_ids[: zh1.system_len])
    assert "German" not in llama3_tok.decode(zh1.prefix_ids)


def test_results_are_cached_but_returned_as_copies(llama3_tok):
    pb = PromptBuilder(llama3_tok, PromptConfig())
    a = pb.first_turn("de", 1)
    a.prefix_ids.append(-1)
    a.suffix_ids.clear()
    b = pb.first_turn("German", 1)
    assert b.prefix_ids[-1] != -1 and b.suffix_ids
    assert ("German", 1) in pb._first_cache and len(pb._first_cache) == 1


@pytest.mark.parametrize("value", ["de", "DE", "German", "german", " gERMAN "])
def test_language_name_accepts_codes_and_names(llama3_tok, value):
    assert PromptBuilder(llama3_tok, PromptConfig()).language_name(value) == "German"


@pytest.mark.parametrize("value", ["xx", "", "Klingon", None, 3])
def test_unknown_language_lists_supported(llama3_tok, value):
    pb = PromptBuilder(llama3_tok, PromptConfig())
    with pytest.raises(InvalidArgument, match=r"unsupported language.*de \(German\).*ja \(Japanese\)"):
        pb.language_name(value)
    with pytest.raises(InvalidArgument):
        pb.first_turn(value, 1)


@pytest.mark.parametrize("m", [0, 5, -1, 1.0, True, "1"])
def test_bad_latency_multiplier(llama3_tok, m):
    pb = PromptBuilder(llama3_tok, PromptConfig())
    with pytest.raises(InvalidArgument, match="latency multiplier"):
        pb.first_turn("de", m)
    with pytest.raises(InvalidArgument, match="latency multiplier"):
        pb.next_turn(m)


def test_empty_latency_tokens_format_to_empty_string(llama3_tok):
    cfg = PromptConfig(latency_tokens=[], system_text="To {language}{latency}!")
    turn = PromptBuilder(llama3_tok, cfg).first_turn("fr", 4)
    text = "\n\n" + LLAMA3_DATE_TEXT + "To French!"
    assert turn.prefix_ids[4 : turn.system_len - 1] == enc(llama3_tok, text)


def test_missing_special_tokens_are_named(chatml_tok):
    with pytest.raises(ValueError, match=r"lacks.*<\|eot_id\|>.*<\|begin_of_text\|>"):
        PromptBuilder(chatml_tok, PromptConfig())  # llama3 template on a chatml-only tokenizer
    with pytest.raises(ValueError, match="<nope>"):
        PromptBuilder(chatml_tok, dataclasses.replace(chatml_prompt(), speech_token="<nope>"))


def test_turn_prompt_input_ids():
    turn = TurnPrompt([1, 2], 3, [4], system_len=1, speech_token_id=9)
    assert turn.input_ids() == [1, 2, 9, 9, 9, 4] and turn.num_tokens == 6
