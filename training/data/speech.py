"""English speech synthesis in process: eSpeak NG through ``espeakng-loader``'s bundled library, with word timings.

The library (libespeak-ng 1.52 and its data, inside the ``espeakng-loader`` wheel) is driven through ctypes in
synchronous mode: ``espeak_Synth`` calls our callback with 22.05 kHz int16 samples and events, among them one WORD
event per word eSpeak speaks, carrying the word's character position in the text and its first sample. eSpeak's words
are not the text's words (``1961`` is read as three words, ``--`` may swallow the next word), so the events are mapped
back to the text's whitespace words by character position (:func:`word_ends_from_events`).

The library holds global state, so there is one engine per process, initialised on first use in that process (a
DataLoader worker initialises its own after the fork). Not thread-safe: synthesise from one thread per process.
"""

from __future__ import annotations

import _ctypes
import atexit
import ctypes
import functools
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass

import numpy as np
from scipy.signal import firwin, resample_poly

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ESPEAK_RATE = 22050
# Audio kept after the last word's end (eSpeak pads a sentence with ~0.3 s of silence; utterances add their own pauses).
TAIL_S = 0.05

# eSpeak NG's English voices (espeak-ng-data/lang/gmw/en*), without the Shavian-alphabet one.
BASE_VOICES = (
    "en",  # Great Britain
    "en-us",
    "en-029",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-us-nyc",
)
# Variants (espeak-ng-data/voices/!v) that sound like speech: formant sets m*/f*, the Klatt synthesisers and a few
# named ones. "" is the base voice's own default.
TRAIN_VARIANTS = (
    "",
    "m1",
    "m2",
    "m3",
    "m5",
    "m6",
    "m7",
    "m8",
    "f1",
    "f2",
    "f4",
    "f5",
    "klatt",
    "klatt3",
    "klatt4",
    "Andy",
    "Annie",
    "adam",
    "david",
    "edward",
    "john",
    "linda",
    "max",
    "paul",
    "robert",
    "steph",
    "travis",
)
# Held out: these variants are never used in training, with any base voice; the held-out split uses only them.
HELDOUT_VARIANTS = ("m4", "f3", "klatt2", "michel")
RATE_RANGE = (130, 230)  # words per minute
PITCH_RANGE = (30, 70)  # eSpeak's 0..100 scale


def voice_names(split: str) -> list[str]:
    """The eSpeak voice names (``base+variant``) of a split: ``"train"`` or ``"heldout"``; the two never overlap."""
    if split == "train":
        variants = TRAIN_VARIANTS
    elif split == "heldout":
        variants = HELDOUT_VARIANTS
    else:
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return [base + (f"+{v}" if v else "") for base in BASE_VOICES for v in variants]


@dataclass(frozen=True, slots=True)
class Voice:
    """One speaker: an eSpeak voice name (``en-us+m3``), speed in words per minute and pitch (0..100)."""

    name: str
    rate: int = 175
    pitch: int = 50

    def __post_init__(self) -> None:
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"bad voice name {self.name!r}")
        if not 80 <= self.rate <= 450:
            raise ValueError(f"voice rate {self.rate} wpm outside 80..450")
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"voice pitch {self.pitch} outside 0..100")


def random_voice(rng: np.random.Generator, split: str) -> Voice:
    """A voice of ``split`` with a random speed in :data:`RATE_RANGE` and pitch in :data:`PITCH_RANGE`."""
    names = voice_names(split)
    return Voice(
        names[int(rng.integers(len(names)))],
        int(rng.integers(RATE_RANGE[0], RATE_RANGE[1] + 1)),
        int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
    )


@dataclass(slots=True)
class Synthesis:
    """A synthesised text: 16 kHz float32 mono audio and, per whitespace word of the text, its start and end (s)."""

    audio: np.ndarray
    word_starts: list[float]
    word_ends: list[float]

    @property
    def duration_s(self) -> float:
        return len(self.audio) / SAMPLE_RATE


def word_ends_from_events(text: str, events: list[tuple[int, int]], speech_end: int) -> tuple[list[int], list[int]]:
    """Map eSpeak WORD events onto the whitespace words of ``text``: (start sample, end sample) per word.

    ``events`` are (character position, 1-based as eSpeak reports it, first sample) of each WORD event in order;
    ``speech_end`` is the sample where the last word ends. An event belongs to the whitespace word containing its
    position (or the next word, if it points at whitespace). A word starts at its first event and ends where the
    first event of a later word starts (the last word at ``speech_end``); a word with no event of its own (a lone
    ``--``, or a word eSpeak merged into its neighbour) starts and ends there too. Ends therefore never decrease.
    """
    words = [(m_start, m_end) for m_start, m_end in _word_spans(text)]
    if not words:
        return [], []
    owner = []  # (word index, sample) per event, in order
    w = 0
    for pos, sample in events:
        char = pos - 1
        while w < len(words) - 1 and char >= words[w][1]:
            w += 1
        owner.append((w, sample))
    starts: list[int] = []
    ends: list[int] = []
    for i in range(len(words)):
        own = [s for j, s in owner if j == i]
        later = [s for j, s in owner if j > i]
        end = min(later) if later else speech_end
        start = min(own) if own else end
        start = min(start, end)
        if starts:
            start = max(start, ends[-1]) if not own else max(start, starts[-1])
        starts.append(start)
        ends.append(max(end, ends[-1]) if ends else end)
    return starts, ends


def _word_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        j = i
        while j < n and not text[j].isspace():
            j += 1
        spans.append((i, j))
        i = j
    return spans


class _EspeakEvent(ctypes.Structure):
    # espeak_EVENT of speak_lib.h.
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent))
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1
_RATE, _VOLUME, _PITCH = 1, 2, 3
_POS_CHARACTER, _CHARS_UTF8 = 1, 1
_BUFFER_MS = 1000  # callback buffer: fewer, larger calls into Python


class Espeak:
    """The process's eSpeak NG library: :meth:`synthesize` text with a :class:`Voice`. Use :func:`engine`.

    eSpeak keeps state across calls that no API resets (a pitch-flutter index that runs on over all audio ever made,
    echo buffers) and draws noise from libc's ``rand()``, so the same text can come out slightly differently
    depending on what was synthesised before. :meth:`reset` makes a synthesis reproducible: it unloads the library
    and loads it afresh (a private copy of the shared object, so that nothing else holds it open; about 4 ms), and
    seeds ``rand()``.
    """

    def __init__(self) -> None:
        import espeakng_loader

        self._data_path = espeakng_loader.get_data_path().encode()
        self._dir = tempfile.mkdtemp(prefix="espeak-")
        atexit.register(shutil.rmtree, self._dir, ignore_errors=True)
        self._path = os.path.join(self._dir, "libespeak-ng-private.so")
        shutil.copyfile(espeakng_loader.get_library_path(), self._path)
        self._libc = ctypes.CDLL(None)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int]] = []
        self._callback = _CALLBACK(self._on_synth)  # kept referenced: the library calls it
        self._lib: ctypes.CDLL | None = None
        self._load()

    def _load(self) -> None:
        self._lib = ctypes.CDLL(self._path)
        self._lib.espeak_Initialize.restype = ctypes.c_int
        rate = self._lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, self._data_path, _INITIALIZE_DONT_EXIT
        )
        if rate != ESPEAK_RATE:
            raise RuntimeError(f"espeak_Initialize returned {rate}, expected a {ESPEAK_RATE} Hz library")
        self._lib.espeak_SetSynthCallback(self._callback)
        self._voice: str | None = None

    def reset(self, seed: int) -> None:
        """Reload the library (fresh state) and seed libc's ``rand()``: what follows depends only on ``seed`` and
        on the calls made after this one."""
        self._lib.espeak_Terminate()
        _ctypes.dlclose(self._lib._handle)
        self._load()
        self._libc.srand(ctypes.c_uint(seed & 0xFFFFFFFF))

    def _on_synth(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.frombuffer(ctypes.string_at(wav, 2 * num_samples), np.int16))
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_WORD:
                self._events.append((events[i].text_position, events[i].sample))
            i += 1
        return 0

    def synthesize_raw(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """``text`` at 22.05 kHz: int16 samples and the WORD events (character position, sample)."""
        if voice.name != self._voice:
            if self._lib.espeak_SetVoiceByName(voice.name.encode()) != 0:
                raise ValueError(f"eSpeak has no voice {voice.name!r}")
            self._voice = voice.name
        self._lib.espeak_SetParameter(_RATE, voice.rate, 0)
        self._lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
        self._chunks, self._events = [], []
        data = text.encode("utf-8")
        err = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak_Synth failed with error {err}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio, self._events

    def synthesize(self, text: str, voice: Voice) -> Synthesis:
        """``text`` read by ``voice``: 16 kHz float32 audio ending :data:`TAIL_S` after the last word, word times."""
        if not text.strip():
            raise ValueError("cannot synthesise empty text")
        raw, events = self.synthesize_raw(text, voice)
        loud = _loud_frames(raw)
        speech_end = min(len(raw), int(loud.nonzero()[0][-1] + 1) * _FRAME) if loud.any() else len(raw)
        starts, ends = word_ends_from_events(text, events, speech_end)
        ends = [_trim_silence(loud, s, e) for s, e in zip(starts, ends)]
        keep = min(len(raw), speech_end + int(TAIL_S * ESPEAK_RATE))
        # 0.8: some variants peak at full scale (eSpeak clips them); this leaves headroom for augmentation.
        samples = raw[:keep].astype(np.float32) * (0.8 / 32768.0)
        audio = resample_poly(samples, _UP, _DOWN, window=_resample_filter())
        return Synthesis(
            audio.astype(np.float32, copy=False),
            [s / ESPEAK_RATE for s in starts],
            [e / ESPEAK_RATE for e in ends],
        )


_UP, _DOWN = SAMPLE_RATE // 50, ESPEAK_RATE // 50  # 320 / 441


@functools.cache
def _resample_filter() -> np.ndarray:
    # The FIR filter resample_poly designs by default (Kaiser, beta 5), built once instead of per call.
    max_rate = max(_UP, _DOWN)
    half_len = 10 * max_rate
    return firwin(2 * half_len + 1, 1.0 / max_rate, window=("kaiser", 5.0)).astype(np.float32)


_FRAME = 220  # 10 ms at 22.05 kHz
_SILENCE = 0.01  # of the clip's peak frame RMS (-40 dB)


def _loud_frames(raw: np.ndarray) -> np.ndarray:
    """Per 10 ms frame of ``raw``: whether it is louder than -40 dB below the clip's loudest frame."""
    n = len(raw) // _FRAME
    frames = raw[: n * _FRAME].astype(np.float32).reshape(n, _FRAME)
    rms = np.sqrt((frames * frames).mean(axis=1))
    if not n or rms.max() == 0:
        return np.zeros(n, bool)
    return rms > _SILENCE * rms.max()


def _trim_silence(loud: np.ndarray, start: int, end: int) -> int:
    """``end`` (a sample) moved back over the silence (pause) that precedes it, never before ``start``."""
    lo, hi = start // _FRAME, min(end // _FRAME, len(loud))
    if hi <= lo:
        return end
    last = np.nonzero(loud[lo:hi])[0]
    if not len(last):
        return end
    return max(start, min(end, (lo + int(last[-1]) + 1) * _FRAME))


_engine: Espeak | None = None
_engine_pid: int | None = None
_engine_lock = threading.Lock()


def engine() -> Espeak:
    """This process's :class:`Espeak`, initialised on first use (again after a fork: DataLoader workers)."""
    global _engine, _engine_pid
    with _engine_lock:
        if _engine is None or _engine_pid != os.getpid():
            _engine = Espeak()
            _engine_pid = os.getpid()
            log.debug("eSpeak NG initialised in process %d", _engine_pid)
        return _engine


def synthesize(text: str, voice: Voice) -> Synthesis:
    """Synthesise ``text`` with ``voice`` in this process (see :meth:`Espeak.synthesize`)."""
    return engine().synthesize(text, voice)


def reset(seed: int) -> None:
    """Make what this process synthesises next reproducible from ``seed`` (see :meth:`Espeak.reset`)."""
    engine().reset(seed)
