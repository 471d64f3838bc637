"""Incremental detokenization: text deltas that are safe to send, across tokens and turns (docs/model.md §6.5).

The stream's text is the paper's: each turn's ids decoded with ``skip_special_tokens=True`` and stripped of
leading and trailing whitespace, the non-empty turn texts joined by a separator (" ", or "" for Chinese and
Japanese). One difference: the paper decodes each turn on its own, so a multibyte character whose bytes are split
across a turn boundary turns into U+FFFD and is dropped. Here the ids that hold the incomplete character carry
into the next turn, and the character appears there.

Each ``add`` decodes only a small window of recent ids (the vLLM/TGI "prefix offset" scheme): the window starts
at a token boundary that was also a character boundary, and the text of the tokens before the read offset has
already been sent. A decode that ends in U+FFFD may end in an incomplete character: everything before that last
U+FFFD is sent, the rest waits for more ids. (A U+FFFD the model really generated is sent once more ids follow.)
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream's generated ids into text deltas.

    ``add(ids)`` returns the text that is now final; ``end_turn()`` closes the turn. The concatenation of everything
    returned equals the joined turn texts (see the module docstring). Trailing whitespace is held back until more
    text of the same turn follows, and dropped at the end of the turn; the separator is sent just before the first
    text of a turn that follows a non-empty turn.
    """

    def __init__(self, tokenizer, separator: str):
        if not isinstance(separator, str):
            raise ValueError(f"invalid separator={separator!r}: expected a string")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # The Rust tokenizer directly: transformers 5's decode adds only Python overhead for BPE tokenizers
            # (it skips clean_up_tokenization_spaces for them).
            self._decode = lambda ids: backend.decode(ids, skip_special_tokens=True)
        else:
            self._decode = lambda ids: tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        self.separator = separator
        self._window: list[int] = []  # ids from the last known character boundary but one
        self._read = 0  # ids before this index in the window have been sent (they give the decode context)
        self._extra = 0  # characters decoded from the ids at and after _read that were already sent
        self._held = ""  # trailing whitespace of the current turn, not yet sent
        self._turn_has_text = False
        self._any_text = False  # whether an earlier turn sent text (then a separator precedes the next)

    def add(self, ids: Sequence[int]) -> str:
        """Add ids of the current turn; return the text that became final."""
        if not ids:
            return ""
        self._window.extend(int(i) for i in ids)
        return self._shape(self._read_new())

    def end_turn(self) -> str:
        """Close the current turn. Its trailing whitespace is dropped; ids of an incomplete character carry into
        the next turn. Returns the text that became final (with these rules, always empty)."""
        self._held = ""
        self._turn_has_text = False
        # Keep only the ids not yet fully sent; the next turn's decode starts at them (_extra stays valid).
        self._window = self._window[self._read :]
        self._read = 0
        return ""

    def _read_new(self) -> str:
        """Decode the window; return the new complete text of the turn and advance the offsets."""
        prefix_text = self._decode(self._window[: self._read]) if self._read else ""
        text = self._decode(self._window)
        # Lossy UTF-8 decoding turns an incomplete character at the end into exactly one U+FFFD, and more bytes
        # change nothing before it (UTF-8 self-synchronizes): only a last U+FFFD can still become a character.
        incomplete = text.endswith(REPLACEMENT)
        complete = text[:-1] if incomplete else text
        start = len(prefix_text) + self._extra
        new = complete[start:]
        if incomplete:
            self._extra += len(new)
        else:
            # The window's end is a character boundary: the ids since the last one become the decode context.
            self._window = self._window[self._read :]
            self._read = len(self._window)
            self._extra = 0
        return new

    def _shape(self, new: str) -> str:
        """Apply the turn's strip and the separator to new raw text of the turn."""
        if not self._turn_has_text:
            new = new.lstrip()
            if not new:
                return ""
        text = self._held + new
        body = text.rstrip()
        self._held = text[len(body) :]
        if not body:
            return ""
        if not self._turn_has_text:
            self._turn_has_text = True
            if self._any_text:
                body = self.separator + body
            self._any_text = True
        return body
