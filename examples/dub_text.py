"""Dub a video with new words spoken in the on-screen person's own voice, and check the mouth says them.

python examples/dub_text.py VIDEO "TEXT" OUTPUT.mp4
"""

import sys

import lipsync_cli as lipsync

video, text, output = sys.argv[1], sys.argv[2], sys.argv[3]
result = lipsync.dub(video, text, output=output, force=True, measure=True)
print(f"{result.output}: {result.frames} frames, {result.duration:.2f} s, stages {result.timings}")
print(f"re-tracked: p/b/m closed {result.articulation['bilabial']:.0%}, contrast {result.articulation['contrast']:.1f}")
