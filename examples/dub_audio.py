"""Dub a video with any speech recording (wav/mp3/m4a/flac, any rate or channel count).

python examples/dub_audio.py VIDEO SPEECH OUTPUT.mp4 [bounce|loop|cut]
"""

import sys
from pathlib import Path

from lipsync_cli.dub import dub
from lipsync_cli.settings import Settings

video, speech, output = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
mode = sys.argv[4] if len(sys.argv) > 4 else "bounce"
result = dub(video, None, speech, output, Settings(sync_mode=mode), force=True)
print(f"{result.output}: {result.frames} frames, {result.duration:.2f} s, stages {result.timings}")
