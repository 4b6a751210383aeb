"""Dub a video with any speech recording (wav/mp3/m4a/flac, any rate or channel count), used as given.

python examples/dub_audio.py VIDEO SPEECH OUTPUT.mp4 [bounce|loop|cut] [TRANSCRIPT]

With the transcript (text or a text file) the p/b/m and vowels are timed exactly and the output is measured.
"""

import sys

import lipsync_cli as lipsync

video, speech, output = sys.argv[1], sys.argv[2], sys.argv[3]
mode = sys.argv[4] if len(sys.argv) > 4 else "bounce"
words = sys.argv[5] if len(sys.argv) > 5 else None
measure = words is not None
result = lipsync.dub(video, audio=speech, output=output, sync_mode=mode, transcript=words, measure=measure, force=True)
print(f"{result.output}: {result.frames} frames, {result.duration:.2f} s, stages {result.timings}")
if result.articulation:
    print(f"re-tracked: p/b/m closed {result.articulation['bilabial']:.0%}")
