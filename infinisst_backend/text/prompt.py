"""The multi-turn InfiniSST prompt: system prompt, per-turn token ids, EOS set and languages.

Every chunk of speech is one chat turn: a user message made of ``12*m`` speech placeholders, then an assistant
header after which the LLM writes the translation of that chunk (docs/model.md §5). Two templates exist:

``llama3`` (docs/model.md §5.1, §5.3), the paper's Llama-3.1 layout::

    first turn:  <|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: ...
                 {system text with <latency_m>}<|eot_id|>                                  <- S tokens
                 <|start_header_id|>user<|end_header_id|>\\n\\n<sp_patch>*12m
                 <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n
    later turns: <|eot_id|><|start_header_id|>user<|end_header_id|>\\n\\n<sp_patch>*12m
                 <|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n

``chatml`` (docs/model.md §7.4), the Qwen2.5 layout::

    first turn:  <|im_start|>system\\n{system text}<|im_end|>\\n                         <- S tokens
                 <|im_start|>user\\n<sp_patch>*12m<|im_end|>\\n<|im_start|>assistant\\n
    later turns: <|im_end|>\\n<|im_start|>user\\n<sp_patch>*12m<|im_end|>\\n<|im_start|>assistant\\n

A later turn starts by closing the previous assistant turn, whose end token was generated but never fed.

Ids are built from pieces rather than by running the tokenizer's Jinja chat template, so any tokenizer that
has the template's special tokens works. Special tokens are looked up by their string; each maximal run of
text between two special tokens is encoded in one call, which is exactly how a tokenizer splits the rendered
template string.
"""

from __future__ import annotations

from dataclasses import dataclass

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, MAX_LATENCY_MULTIPLIER, PromptConfig
from infinisst_backend.errors import InvalidArgument

# Llama-3.1's chat template always writes this date header into the system message (docs/model.md §5.1).
LLAMA3_DATE_TEXT = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"

# A piece is a special-token id (int) or text to encode (str).
Piece = int | str


@dataclass(slots=True)
class TurnPrompt:
    """The input ids of one chat turn around its speech placeholders."""

    prefix_ids: list[int]  # tokens before the speech (first turn: includes the system prompt)
    num_speech: int  # 12*m placeholders in input_ids (a partial chunk splices in fewer rows, docs/model.md §5.2)
    suffix_ids: list[int]  # tokens after the speech, ending with the assistant header
    system_len: int  # S for the first turn (the tokens eviction keeps), 0 otherwise
    speech_token_id: int  # id of the placeholder token

    def input_ids(self) -> list[int]:
        """prefix + [speech_token_id] * num_speech + suffix: the turn as the decoding processors see it."""
        return self.prefix_ids + [self.speech_token_id] * self.num_speech + self.suffix_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prefix_ids) + self.num_speech + len(self.suffix_ids)

    def copy(self) -> TurnPrompt:
        return TurnPrompt(
            list(self.prefix_ids), self.num_speech, list(self.suffix_ids), self.system_len, self.speech_token_id
        )


class PromptBuilder:
    """Builds the token ids of every turn for one tokenizer and :class:`PromptConfig`.

    Results are cached per (language, m); callers get copies they may modify.
    """

    def __init__(self, tokenizer, cfg: PromptConfig):
        cfg.validate()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self._vocab: dict[str, int] = tokenizer.get_vocab()
        needed = [cfg.speech_token, *cfg.eos_tokens, *cfg.latency_tokens, *self._template_tokens()]
        missing = [tok for tok in dict.fromkeys(needed) if tok not in self._vocab]
        if missing:
            raise ValueError(f"the tokenizer lacks the prompt's special token(s) {missing} (template {cfg.template!r})")
        self.speech_token_id: int = self._vocab[cfg.speech_token]
        self.eos_ids: frozenset[int] = frozenset(self._vocab[tok] for tok in cfg.eos_tokens)
        # Lower-cased code or name -> canonical name.
        self._languages: dict[str, str] = {}
        for code, name in cfg.languages.items():
            self._languages[code.lower()] = name
            self._languages[name.lower()] = name
        self._first_cache: dict[tuple[str, int], TurnPrompt] = {}
        self._next_cache: dict[int, TurnPrompt] = {}

    # ---------------------------------------------------------------- public API

    def language_name(self, value: str) -> str:
        """Canonical language name for a code or a name, case-insensitively ("de"/"german" -> "German")."""
        name = self._languages.get(value.strip().lower()) if isinstance(value, str) else None
        if name is None:
            supported = ", ".join(f"{code} ({name})" for code, name in self.cfg.languages.items())
            raise InvalidArgument(f"unsupported language {value!r}; supported: {supported}")
        return name

    def first_turn(self, language: str, m: int) -> TurnPrompt:
        """The first turn of a stream: system prompt (S tokens), user header, 12m placeholders, assistant header."""
        self._check_m(m)
        key = (self.language_name(language), m)
        if key not in self._first_cache:
            system = self._encode(self._system_pieces(*key))
            user = self._encode(self._user_header())
            suffix = self._encode(self._assistant_header())
            self._first_cache[key] = self._turn(system + user, m, suffix, system_len=len(system))
        return self._first_cache[key].copy()

    def next_turn(self, m: int) -> TurnPrompt:
        """A later turn: closes the previous assistant turn, then user header, placeholders, assistant header."""
        self._check_m(m)
        if m not in self._next_cache:
            prefix = self._encode(self._close_turn() + self._user_header())
            suffix = self._encode(self._assistant_header())
            self._next_cache[m] = self._turn(prefix, m, suffix, system_len=0)
        return self._next_cache[m].copy()

    def system_len(self, language: str, m: int) -> int:
        """S: the number of system-prompt tokens of the first turn."""
        return self.first_turn(language, m).system_len

    # ---------------------------------------------------------------- template pieces

    def _template_tokens(self) -> list[str]:
        if self.cfg.template == "llama3":
            return ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return ["<|im_start|>", "<|im_end|>"]

    def _system_pieces(self, language: str, m: int) -> list[Piece]:
        body = self._system_body(language, m)
        if self.cfg.template == "llama3":
            sp = self._special
            header = [sp("<|begin_of_text|>"), sp("<|start_header_id|>"), "system", sp("<|end_header_id|>"), "\n\n"]
            return header + [LLAMA3_DATE_TEXT] + body + [sp("<|eot_id|>")]
        return [self._special("<|im_start|>"), "system\n", *body, self._special("<|im_end|>"), "\n"]

    def _user_header(self) -> list[Piece]:
        return self._header("user")

    def _assistant_header(self) -> list[Piece]:
        # The tokens between the speech and the assistant's first token: end the user turn, open the assistant's.
        return self._close_turn() + self._header("assistant")

    def _header(self, role: str) -> list[Piece]:
        if self.cfg.template == "llama3":
            return [self._special("<|start_header_id|>"), role, self._special("<|end_header_id|>"), "\n\n"]
        return [self._special("<|im_start|>"), f"{role}\n"]

    def _close_turn(self) -> list[Piece]:
        if self.cfg.template == "llama3":
            return [self._special("<|eot_id|>")]
        return [self._special("<|im_end|>"), "\n"]

    def _system_body(self, language: str, m: int) -> list[Piece]:
        """The system text with {language} filled in and {latency} as its special token (or "")."""
        marker = "\x00"  # stands for the latency token while formatting, then splits the text around it
        latency = marker if self.cfg.latency_tokens else ""
        try:
            text = self.cfg.system_text.format(language=language, latency=latency)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"invalid prompt.system_text={self.cfg.system_text!r}: {e!r}") from e
        if not latency:
            return [text]
        latency_id = self._latency_id(m)
        pieces: list[Piece] = []
        for i, part in enumerate(text.split(marker)):
            if i:
                pieces.append(latency_id)
            pieces.append(part)
        return pieces

    def _latency_id(self, m: int) -> int:
        if m > len(self.cfg.latency_tokens):
            raise InvalidArgument(
                f"latency multiplier m={m} has no latency token (this model supports 1..{len(self.cfg.latency_tokens)})"
            )
        return self._vocab[self.cfg.latency_tokens[m - 1]]

    # ---------------------------------------------------------------- helpers

    def _special(self, token: str) -> int:
        return self._vocab[token]

    def _encode(self, pieces: list[Piece]) -> list[int]:
        """Ids of pieces: special ids as is, each maximal run of text encoded at once (as the template would be)."""
        ids: list[int] = []
        text: list[str] = []
        for piece in [*pieces, None]:
            if isinstance(piece, str):
                text.append(piece)
                continue
            if text and "".join(text):
                ids.extend(self.tokenizer.encode("".join(text), add_special_tokens=False))
            text.clear()
            if piece is not None:
                ids.append(piece)
        return ids

    def _turn(self, prefix: list[int], m: int, suffix: list[int], system_len: int) -> TurnPrompt:
        return TurnPrompt(prefix, EMBEDDINGS_PER_UNIT * m, suffix, system_len, self.speech_token_id)

    @staticmethod
    def _check_m(m: int) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= MAX_LATENCY_MULTIPLIER:
            raise InvalidArgument(
                f"invalid latency multiplier m={m!r}: expected an integer in 1..{MAX_LATENCY_MULTIPLIER}"
            )
