"""Admission control: each stream's worst-case KV footprint is reserved when it opens.

So page allocation never fails later and nothing is ever preempted; a stream that cannot fit is refused at once
with ``CapacityError`` (``UNAVAILABLE`` on the wire). Counts pages only, never tensors.
"""

from __future__ import annotations

import math

from infinisst_backend.config import EMBEDDINGS_PER_UNIT, TOKENS_PER_UNIT, EngineConfig
from infinisst_backend.errors import CapacityError


def worst_case_pages(
    cfg: EngineConfig, m: int, beam_size: int, system_len: int, prompt_tokens: tuple[int, int] | None = None
) -> int:
    """Upper bound on the KV pages one stream can ever hold at once.

    The committed cache never exceeds S + window after eviction (S + the last turn, if one turn is longer than the
    window); a turn adds its prompt and up to 10m generated tokens. ``prompt_tokens``: the lengths of the stream's
    first and later turn prompts; without them every turn is taken to be as long as S + 12m + 10, with a page of
    slack. Beams share that prefix copy-on-write; each live beam and each finished hypothesis (at most
    ``beam_size`` of each) holds at most its own generated tokens plus one copied partial page.
    """
    page = cfg.page_size
    max_new = TOKENS_PER_UNIT * m
    if prompt_tokens is None:
        turn_prompt = system_len + EMBEDDINGS_PER_UNIT * m + 10
        shared = math.ceil((system_len + cfg.max_llm_cache_tokens + turn_prompt + max_new) / page)
    else:
        first, later = prompt_tokens
        committed = system_len + max(cfg.max_llm_cache_tokens, later + max_new)
        shared = math.ceil((max(first, committed + later) + max_new) / page)
    if beam_size == 1:
        return shared + (prompt_tokens is None)  # the page of slack of the estimate without prompt lengths
    per_hypothesis = math.ceil(max_new / page) + 1
    return shared + 2 * beam_size * per_hypothesis


class Admission:
    """Reserves worst-case pages and a stream slot per open stream (thread-safe use is the caller's job)."""

    def __init__(self, cfg: EngineConfig, total_pages: int):
        self.cfg = cfg
        self.total_pages = total_pages
        self.reserved_pages = 0
        self.open_streams = 0

    def admit(self, pages: int) -> None:
        if self.open_streams >= self.cfg.max_streams:
            raise CapacityError(
                f"instance at capacity: {self.open_streams} streams open (max_streams={self.cfg.max_streams}); "
                "retry later or on another instance"
            )
        if self.reserved_pages + pages > self.total_pages:
            free = self.total_pages - self.reserved_pages
            raise CapacityError(
                f"instance at capacity: KV memory full ({free} of {self.total_pages} pages unreserved, "
                f"a new stream needs {pages}); retry later or on another instance"
            )
        self.reserved_pages += pages
        self.open_streams += 1

    def release(self, pages: int) -> None:
        self.reserved_pages -= pages
        self.open_streams -= 1
