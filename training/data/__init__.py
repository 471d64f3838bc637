"""The demo model's training data: text corpus, in-process speech synthesis, augmentation, utterances, turn targets.

- :mod:`training.data.corpus`: Brown + Ding sentences with Apertium Spanish, the held-out split, the corpus file.
- :mod:`training.data.speech`: eSpeak NG in process (16 kHz audio and word end times), train and held-out voices.
- :mod:`training.data.augment`: gain, reverb, noise, silence padding.
- :mod:`training.data.utterances`: ``Utterance`` and ``Sentence``; reading sentences into an utterance.
- :mod:`training.data.trajectories`: ``turn_targets``, the text due after each chunk (InfiniSST's trajectories).
- :mod:`training.data.dataset`: ``SpeechDataset`` (on-the-fly, worker-sharded) and ``heldout_set``.
- :mod:`training.data.sample`: ``python -m training.data.sample OUT.flac``, a held-out Brown sample for the demo.
"""

import importlib

# Imported on first use (PEP 562), so that ``python -m training.data.corpus`` runs a module not yet imported.
_EXPORTS = {
    "Sentence": "utterances",
    "SpeechDataset": "dataset",
    "TextRecord": "corpus",
    "Utterance": "utterances",
    "Voice": "speech",
    "heldout_set": "dataset",
    "load_corpus": "corpus",
    "synthesize": "speech",
    "turn_targets": "trajectories",
    "voice_names": "speech",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
