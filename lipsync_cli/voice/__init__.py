"""Speech out of text and into the on-screen speaker's voice: TTS, speaker embeddings, voice conversion."""
