"""Audio helpers: read WAV/FLAC as 16 kHz mono float32, cut it into pieces, find the bundled speech samples."""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000


def load_audio(path: str | Path) -> np.ndarray:
    """Read a sound file (anything soundfile reads: WAV, FLAC, ...) as 16 kHz mono float32 in [-1, 1].

    Several channels are averaged; other sample rates are resampled with a polyphase filter.
    """
    import soundfile as sf
    from scipy.signal import resample_poly

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such audio file: {path}")
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # [frames, channels]
    mono = data.mean(axis=1)
    if rate != SAMPLE_RATE:
        g = gcd(int(rate), SAMPLE_RATE)
        mono = resample_poly(mono, SAMPLE_RATE // g, int(rate) // g)
    return np.clip(mono, -1.0, 1.0).astype(np.float32)


def split_pieces(samples: np.ndarray, piece_samples: int) -> list[np.ndarray]:
    """Cut ``samples`` into consecutive pieces of ``piece_samples`` (the last one may be shorter; at least one)."""
    if piece_samples <= 0:
        raise ValueError(f"piece size must be > 0 samples, got {piece_samples}")
    pieces = [samples[i : i + piece_samples] for i in range(0, len(samples), piece_samples)]
    return pieces or [samples[:0]]


def random_pieces(samples: np.ndarray, rng: np.random.Generator, low: int, high: int) -> list[np.ndarray]:
    """Cut ``samples`` into consecutive pieces of random sizes in [low, high] samples (the last may be shorter)."""
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low} high={high}")
    pieces, start = [], 0
    while start < len(samples):
        size = int(rng.integers(low, high + 1))
        pieces.append(samples[start : start + size])
        start += size
    return pieces or [samples[:0]]


def samples_dir() -> Path:
    """The folder of speech WAVs shipped by the ``pytest-audioeval`` package (``en/``, ``de/``... subfolders)."""
    from importlib.util import find_spec

    spec = find_spec("pytest_audioeval")  # a namespace package: no __file__
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the pytest-audioeval package (bundled speech samples) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "samples" / "audio"


def sample_file(name: str) -> Path:
    """A bundled sample by relative name, e.g. ``en/quick_brown_fox.wav``."""
    path = samples_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"no bundled sample {name!r} under {samples_dir()}")
    return path
