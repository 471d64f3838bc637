"""Write a longer English speech sample by concatenating the bundled pytest-audioeval WAVs.

Usage: python scripts/make_sample.py OUT.wav   (with the repository importable: the .venv that scripts/setup.sh
writes puts it on sys.path, the image of Dockerfile.triton on PYTHONPATH)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from client.audio import SAMPLE_RATE, load_audio, sample_file

PARTS = ("en/quick_brown_fox.wav", "en/counting.wav", "en/hello_world.wav")
PAUSE_SECONDS = 0.3


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    pause = np.zeros(int(PAUSE_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces = []
    for name in PARTS:
        pieces += [load_audio(sample_file(name)), pause]
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(out), np.concatenate(pieces), SAMPLE_RATE, subtype="FLOAT")


if __name__ == "__main__":
    main()
