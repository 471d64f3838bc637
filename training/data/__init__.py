"""The demo model's training data: text corpus, in-process speech synthesis, augmentation, utterances, turn targets.

- :mod:`training.data.corpus`: Brown + Ding sentences with Apertium Spanish, the held-out split, the corpus file.
- :mod:`training.data.speech`: eSpeak NG in process (16 kHz audio and word end times), train and held-out voices.
- :mod:`training.data.augment`: gain, reverb, noise, silence padding.
- :mod:`training.data.utterances`: ``Utterance`` and ``Sentence``; reading sentences into an utterance.
- :mod:`training.data.trajectories`: ``turn_targets``, the text due after each chunk (InfiniSST's trajectories).
- :mod:`training.data.dataset`: ``SpeechDataset`` (on-the-fly, worker-sharded) and ``heldout_set``.
- :mod:`training.data.sample`: ``python -m training.data.sample OUT.flac``, a held-out Brown sample for the demo.
"""

from training.data.corpus import TextRecord, load_corpus
from training.data.dataset import SpeechDataset, heldout_set
from training.data.speech import Voice, synthesize, voice_names
from training.data.trajectories import turn_targets
from training.data.utterances import Sentence, Utterance

__all__ = [
    "Sentence",
    "SpeechDataset",
    "TextRecord",
    "Utterance",
    "Voice",
    "heldout_set",
    "load_corpus",
    "synthesize",
    "turn_targets",
    "voice_names",
]
