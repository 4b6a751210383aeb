"""lipsync: re-animate a talking face to new speech, offline, on a CPU."""

__version__ = "0.1.0"
