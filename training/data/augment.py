"""Audio augmentation for training: gain, short synthetic reverb, additive white or pink noise, silence padding.

Every function takes a ``numpy.random.Generator``, so a seed fixes the result. Gain, reverb and noise keep the
length; :func:`pad_silence` lengthens the audio and returns how much silence went in front, by which the caller
shifts word times (:meth:`training.data.utterances.Utterance.shifted`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter, oaconvolve

from training.data.speech import SAMPLE_RATE


@dataclass(frozen=True, slots=True)
class AugmentConfig:
    """Probabilities and ranges of each augmentation (dB, seconds)."""

    gain_db: tuple[float, float] = (-12.0, 6.0)
    reverb_p: float = 0.3
    reverb_s: tuple[float, float] = (0.05, 0.3)  # impulse response length (decay to -60 dB)
    reverb_wet: tuple[float, float] = (0.1, 0.5)
    noise_p: float = 0.5
    snr_db: tuple[float, float] = (5.0, 40.0)
    pink_p: float = 0.5  # of the noisy examples, pink rather than white noise
    pad_p: float = 0.2
    pad_s: tuple[float, float] = (0.2, 2.0)

    def __post_init__(self) -> None:
        for name in ("reverb_p", "noise_p", "pink_p", "pad_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], not {getattr(self, name)}")
        for name in ("gain_db", "reverb_s", "reverb_wet", "snr_db", "pad_s"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} must be a range (low, high), not {(lo, hi)}")
        if self.reverb_s[0] <= 0 or self.pad_s[0] < 0:
            raise ValueError("reverb_s must be positive and pad_s non-negative")


def apply_gain(audio: np.ndarray, rng: np.random.Generator, gain_db: tuple[float, float]) -> np.ndarray:
    """``audio`` scaled by a random gain in ``gain_db``, then limited so that its peak stays below 1."""
    out = audio * np.float32(10 ** (rng.uniform(*gain_db) / 20))
    peak = float(np.abs(out).max()) if out.size else 0.0
    return out / np.float32(peak / 0.99) if peak > 0.99 else out


def reverb(audio: np.ndarray, rng: np.random.Generator, length_s: float, wet: float) -> np.ndarray:
    """``audio`` through a synthetic room: an impulse response of exponentially decaying noise (-60 dB at
    ``length_s``), mixed ``wet`` : ``1 − wet`` with the dry signal, scaled back to the dry signal's RMS."""
    if not 0 <= wet <= 1:
        raise ValueError(f"wet must be in [0, 1], not {wet}")
    n = max(2, int(length_s * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9078 * t / length_s)  # ln(1000): -60 dB at length_s
    ir /= np.sqrt((ir * ir).sum())
    wet_signal = oaconvolve(audio, ir.astype(np.float32))[: len(audio)]
    out = (1 - wet) * audio + wet * wet_signal
    return (out * (_rms(audio) / max(_rms(out), 1e-12))).astype(np.float32)


# Paul Kellet's "economy" pink-noise filter (poles and zeros spread over the audio band): within ~0.5 dB of 1/f
# from ~10 Hz up; an IIR filter, far cheaper than shaping a long FFT.
_PINK_B = np.array([0.049922035, -0.095993537, 0.050612699, -0.004408786])
_PINK_A = np.array([1.0, -2.494956002, 2.017265875, -0.522189400])


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-RMS pink (1/f power) noise: white noise through a 1/f filter."""
    noise = lfilter(_PINK_B, _PINK_A, rng.standard_normal(n, dtype=np.float32))
    return (noise / max(_rms(noise), 1e-12)).astype(np.float32)


def add_noise(audio: np.ndarray, rng: np.random.Generator, snr_db: float, pink: bool) -> np.ndarray:
    """``audio`` plus white or pink noise ``snr_db`` below the RMS of the audio's non-silent part."""
    n = len(audio)
    noise = pink_noise(n, rng) if pink else rng.standard_normal(n, dtype=np.float32)
    level = _speech_rms(audio) / 10 ** (snr_db / 20)
    return (audio + noise * np.float32(level)).astype(np.float32)


def pad_silence(audio: np.ndarray, rng: np.random.Generator, pad_s: tuple[float, float]) -> tuple[np.ndarray, float]:
    """``audio`` with random silence before and after it (each in ``pad_s``); returns it and the leading silence (s)."""
    lead = int(rng.uniform(*pad_s) * SAMPLE_RATE)
    tail = int(rng.uniform(*pad_s) * SAMPLE_RATE)
    out = np.concatenate([np.zeros(lead, np.float32), audio.astype(np.float32), np.zeros(tail, np.float32)])
    return out, lead / SAMPLE_RATE


def augment(
    audio: np.ndarray, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, float]:
    """One random augmentation of ``audio`` (float32 16 kHz): maybe silence padding, maybe reverb, maybe noise, then
    gain. Returns the new audio and the seconds of silence padded in front (0 if none): shift word times by it."""
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono (1-D), not shape {audio.shape}")
    out = audio.astype(np.float32, copy=True)
    shift = 0.0
    if rng.random() < config.pad_p:
        out, shift = pad_silence(out, rng, config.pad_s)
    if rng.random() < config.reverb_p:
        out = reverb(out, rng, float(rng.uniform(*config.reverb_s)), float(rng.uniform(*config.reverb_wet)))
    if rng.random() < config.noise_p:
        out = add_noise(out, rng, float(rng.uniform(*config.snr_db)), bool(rng.random() < config.pink_p))
    out = apply_gain(out, rng, config.gain_db)
    return out.astype(np.float32, copy=False), shift


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if len(x) else 0.0


def _speech_rms(audio: np.ndarray) -> float:
    """RMS over the samples louder than 1% of the peak (silence between sentences would lower the SNR's reference)."""
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    if peak == 0:
        return 1e-4
    return _rms(audio[np.abs(audio) > 0.01 * peak])
