"""Dub a video with new words spoken by the bundled TTS voice.

python examples/dub_text.py VIDEO "TEXT" OUTPUT.mp4
"""

import sys
from pathlib import Path

from lipsync_cli.dub import dub
from lipsync_cli.settings import Settings

video, text, output = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
result = dub(video, text, None, output, Settings(), force=True)
print(f"{result.output}: {result.frames} frames, {result.duration:.2f} s, stages {result.timings}")
