"""Speech out of text and into the on-screen speaker's voice.

tts.py      piper (bundled voice) or espeak-ng: text -> speech, with piper's phone timings
ge2e.py     resemblyzer's GE2E speaker encoder in numpy (forward and backward), weights read from its wheel
speaker.py  who is speaking: VAD (speech frames only) and GE2E speaker embeddings
convert.py  WORLD-based voice conversion of TTS speech towards a speaker's profile, length kept sample-exact
xtts.py     optional Coqui XTTS v2 backend: zero-shot cloning from the user's own model files
"""
