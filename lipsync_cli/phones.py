"""Which phone is spoken when: pocketsphinx forced alignment (text known) or phone recognition (text unknown).

The mouth needs a few hard facts from the audio that spectral features blur: the lips must close for P/B/M and
rest in pauses. Both come from phone timings. The acoustic model, dictionary and phone LM ship inside the
pocketsphinx wheel; words missing from the dictionary get pronunciations from espeak-ng (bundled with piper).
Times are seconds; labels are ARPAbet without stress ("M", "AA") and "SIL" for silence and noise.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from lipsync_cli.audio import SR, voice_activity
from lipsync_cli.errors import LipsyncError
from lipsync_cli.progress import log, track

FRAME_S = 0.01  # pocketsphinx frame period
SIL = "SIL"
BILABIALS = {"P", "B", "M"}
STOPS = {"P", "B", "T", "D", "K", "G"}
# A stop after a pause is silent until its release, so only the sound can say when it ends. Piper's durations put
# the release of "but" after a comma 20-65 ms before its burst (the vowel's first frame shown open while the lips
# are still shut); its other stops after pauses end 2-48 ms after their sound's onset (24 sentences: B 2-20 ms).
RELEASE_S = 0.015  # a stop ends at least this long after its sound's onset (the burst)
ONSET_RISE_DB = 30.0  # the onset: the first 5 ms frame this far above the pause's quietest one...
ONSET_PEAK_DB = 45.0  # ...and no further than this below the speech's loudest
MAX_SETTLE_S = 0.12  # a stop is moved at most this far (further means the pause was mislabelled, not mistimed)
CHUNK_S = 30.0  # phone-level passes and phone recognition work on pieces this long, cut at pauses
BLOCK_S = 600.0  # word-level alignment passes see at most this much audio (memory grows with length)


@dataclass
class Phone:
    label: str
    start: float
    end: float


@dataclass
class Word:
    word: str
    start: float
    end: float
    phones: list[Phone]


# ------------------------------------------------------------------ IPA <-> ARPAbet

IPA_TO_ARPABET = {
    "p": "P", "b": "B", "t": "T", "d": "D", "k": "K", "ɡ": "G", "g": "G", "f": "F", "v": "V", "θ": "TH",
    "ð": "DH", "s": "S", "z": "Z", "ʃ": "SH", "ʒ": "ZH", "h": "HH", "m": "M", "n": "N", "ŋ": "NG", "l": "L",
    "ɫ": "L", "ɹ": "R", "r": "R", "ɾ": "T", "ʔ": "T", "w": "W", "ʍ": "W", "j": "Y", "x": "K", "ç": "HH",
    "tʃ": "CH", "dʒ": "JH",
    "ɑ": "AA", "ɒ": "AA", "æ": "AE", "a": "AE", "ʌ": "AH", "ə": "AH", "ɐ": "AH", "ɔ": "AO", "aʊ": "AW",
    "aɪ": "AY", "ɛ": "EH", "e": "EH", "ɚ": "ER", "ɜ": "ER", "ɝ": "ER", "eɪ": "EY", "ɪ": "IH", "ᵻ": "IH",
    "i": "IY", "oʊ": "OW", "o": "OW", "ɔɪ": "OY", "ʊ": "UH", "u": "UW",
}  # fmt: skip
_DIGRAPHS = {k for k in IPA_TO_ARPABET if len(k) == 2}
_STRESS = {"ˈ", "ˌ"}
_LENGTH = {"ː", "ˑ"}


def group_ipa(symbols: Sequence[str]) -> list[tuple[str, list[int]]]:
    """Group a stream of IPA code points into phones: [(phone, indices of the symbols it took), ...].

    Stress marks join the next phone, length marks and combining diacritics the previous one, and diphthongs /
    affricates ("aɪ", "tʃ") become one phone. Spaces and punctuation come back as their own tokens.
    """
    out: list[tuple[str, list[int]]] = []
    pending: list[int] = []
    i = 0
    while i < len(symbols):
        s = symbols[i]
        if s in _STRESS:
            pending.append(i)
            i += 1
        elif (s in _LENGTH or (len(s) == 1 and unicodedata.combining(s))) and out and out[-1][0].strip():
            out[-1] = (out[-1][0] + s, out[-1][1] + [i])
            i += 1
        elif i + 1 < len(symbols) and s + symbols[i + 1] in _DIGRAPHS:
            out.append((s + symbols[i + 1], pending + [i, i + 1]))
            pending, i = [], i + 2
        else:
            out.append((s, pending + [i]))
            pending, i = [], i + 1
    if pending:
        out.append(("", pending))
    return out


def ipa_to_arpabet(phone: str) -> str | None:
    """One IPA phone (as from group_ipa) -> ARPAbet, SIL for pauses, None for what is not a phone."""
    base = "".join(c for c in unicodedata.normalize("NFD", phone) if c not in _LENGTH and not unicodedata.combining(c))
    if base == SIL or (base and not base.strip()) or (base and all(unicodedata.category(c)[0] == "P" for c in base)):
        return SIL
    return IPA_TO_ARPABET.get(base)


def from_ipa(phones: Sequence[tuple[str, float, float]]) -> list[Phone]:
    """(ipa_phone, start, end) triples (e.g. from voice.tts.synthesize_with_phones) -> ARPAbet Phones."""
    out = []
    for p, s, e in phones:
        label = ipa_to_arpabet(p)
        if label is not None:
            out.append(Phone(label, float(s), float(e)))
    return out


def settle_stops(phones: Sequence[Phone], audio16k: np.ndarray, step: float = 0.005) -> list[Phone]:
    """`phones` (a TTS's own timings of `audio16k`) with each stop that follows a pause ending no earlier than
    RELEASE_S after its sound's onset (in `step` s energy frames); the next phone starts where it ends. Other phones
    are kept as they are."""
    out = [Phone(p.label, p.start, p.end) for p in phones]
    hop = int(SR * step)
    x = np.asarray(audio16k, np.float64).ravel()
    n = len(x) // hop
    if n == 0:
        return out
    db = 10 * np.log10((x[: n * hop].reshape(n, hop) ** 2).mean(1) + 1e-14)
    peak = float(db.max())
    for pause, stop, after in zip(out, out[1:], out[2:], strict=False):
        if pause.label != SIL or stop.label not in STOPS:
            continue
        a, b = int(pause.start / step), min(int(np.ceil(pause.end / step)) + 1, n)
        if b <= a:
            continue
        quiet = a + int(np.argmin(db[a:b]))
        limit = min(int((stop.end + MAX_SETTLE_S) / step), n)
        loud = np.flatnonzero(db[quiet:limit] > max(db[quiet] + ONSET_RISE_DB, peak - ONSET_PEAK_DB))
        if not len(loud):
            continue
        end = min((quiet + loud[0]) * step + RELEASE_S, after.end - 0.01)
        if end > stop.end:
            stop.end = after.start = end
    return out


# ------------------------------------------------------------------ dictionary


_ONES = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_LETTERS = {
    "a": "AE", "b": "B", "c": "K", "d": "D", "e": "EH", "f": "F", "g": "G", "h": "HH", "i": "IH", "j": "JH",
    "k": "K", "l": "L", "m": "M", "n": "N", "o": "AA", "p": "P", "q": "K", "r": "R", "s": "S", "t": "T",
    "u": "AH", "v": "V", "w": "W", "x": "K S", "y": "Y", "z": "Z",
}  # fmt: skip


def _number_words(n: int) -> list[str]:
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + ([_ONES[n % 10]] if n % 10 else [])
    for size, name in ((10**9, "billion"), (10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            rest = _number_words(n % size) if n % size else []
            return _number_words(n // size) + [name] + rest
    return []


def _ordinal(words: list[str]) -> list[str]:
    last = words[-1]
    irregular = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth"}
    irregular |= {"nine": "ninth", "twelve": "twelfth"}
    last = irregular.get(last) or (last[:-1] + "ieth" if last.endswith("y") else last + "th")
    return words[:-1] + [last]


def _say_number(digits: str) -> list[str]:
    """Numbers as a US speaker (and espeak) reads them: years in pairs, huge ones digit by digit."""
    n = int(digits)
    if len(digits) > 12 or (digits.startswith("0") and len(digits) > 1):
        return [_ONES[int(d)] for d in digits]
    if len(digits) == 4 and 1100 <= n < 2100 and not 2000 <= n < 2010:
        hi, lo = divmod(n, 100)
        tail = ["hundred"] if lo == 0 else ["oh", _ONES[lo]] if lo < 10 else _number_words(lo)
        return _number_words(hi) + tail
    return _number_words(n)


def text_to_words(text: str) -> list[str]:
    """Lower-case dictionary words: punctuation dropped, numbers (years, ordinals) spelled out."""
    words: list[str] = []
    for tok in re.findall(r"[^\W_]+(?:'[^\W_]+)*", unicodedata.normalize("NFKC", text).lower()):
        for part in re.findall(r"\d+(?:st|nd|rd|th)\b|\d+|\D+", tok):
            m = re.fullmatch(r"(\d+)(st|nd|rd|th)?", part)
            if m is None:
                words.append(part)
            else:
                spoken = _say_number(m[1])
                words += _ordinal(spoken) if m[2] else spoken
    return [w for w in words if w]


def _g2p(word: str) -> str | None:
    """ARPAbet for a word the dictionary lacks: espeak-ng (inside piper) when available, else letter sounds."""
    espeak = _espeak()
    if espeak is not None:
        labels = [ipa_to_arpabet(p) for s in espeak.phonemize("en-us", word) for p, _ in group_ipa(s)]
        arpa = [p for p in labels if p and p != SIL]
        if arpa:
            return " ".join(arpa)
    letters = " ".join(_LETTERS[c] for c in word if c in _LETTERS)
    return letters or None


@lru_cache(maxsize=1)
def _espeak() -> Any:
    try:
        from piper.phonemize_espeak import EspeakPhonemizer

        return EspeakPhonemizer()
    except Exception:  # no piper or no espeak data: letter sounds it is
        return None


# ------------------------------------------------------------------ decoding


def _align_decoder() -> Any:
    """A new aligning decoder (~0.08 s). One per call, never a cached one: a decoder carries state from one
    utterance to the next, and the same audio aligned twice in a process came out 10 ms apart the second time."""
    from pocketsphinx import Decoder

    return Decoder(samprate=SR, lm=None, bestpath=False, loglevel="FATAL")


def _phone_decoder() -> Any:
    """A new phone recogniser (~0.08 s), one per call, for the same reason as _align_decoder."""
    from pocketsphinx import Decoder, get_model_path

    lm = get_model_path("en-us/en-us-phone.lm.bin")
    # settings from the pocketsphinx phoneme-recognition docs
    return Decoder(samprate=SR, allphone=lm, lw=2.0, beam=1e-20, pbeam=1e-20, loglevel="FATAL")


def _word_decoder(thorough: bool = False) -> Any:
    """A new large-vocabulary recogniser (the wheel's en-us model, dictionary and 3-gram LM), one per call as
    _align_decoder. Unless `thorough` (pocketsphinx's defaults, for the eval's word error rates), one fast pass (no
    re-scoring passes, a narrower search): 2.5x quicker, and as good for the phones that matter here
    (docs/articulation_engine.md)."""
    from pocketsphinx import Decoder

    if thorough:
        return Decoder(samprate=SR, loglevel="FATAL")
    return Decoder(samprate=SR, fwdflat=False, bestpath=False, maxhmmpf=3000, maxwpf=5, loglevel="FATAL")


def _pcm(x: np.ndarray) -> bytes:
    return (np.clip(np.asarray(x, np.float32), -1, 1) * 32767).astype("<i2").tobytes()


def _label(name: str) -> str:
    return SIL if name.startswith(("+", "<")) or name == SIL else name


def _known_words(decoder: Any, words: list[str]) -> list[str]:
    """Words the dictionary knows, adding pronunciations for the ones it does not."""
    missing = [w for w in dict.fromkeys(words) if decoder.lookup_word(w) is None]
    added = []
    for w in missing:
        pron = _g2p(w)
        try:
            if pron:
                decoder.add_word(w, pron, update=False)  # set_align_text reads the dictionary afresh
                added.append(w)
        except RuntimeError:
            pass
    if added:
        log(f"align: pronounced {len(added)} unknown word(s) with espeak: {' '.join(added[:8])}")
    return [w for w in words if decoder.lookup_word(w) is not None]


def _word_pass(d: Any, pcm: bytes, words: list[str]) -> list[tuple[str, int, int]] | None:
    """First alignment pass: (word, first_frame, last_frame), "<sil>" for pauses; None if it cannot fit."""
    try:
        d.set_align_text(" ".join(words))
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
    except RuntimeError:
        return None
    if d.hyp() is None:
        return None
    segs = [(re.sub(r"\(\d+\)$", "", s.word), s.start_frame, s.end_frame) for s in d.seg()]
    return segs if any(not w.startswith(("<", "+", "[")) for w, _, _ in segs) else None


def _force_align(d: Any, x: np.ndarray, words: list[str], offset: float) -> list[Word] | None:
    """Two-pass pocketsphinx alignment (words, then phones) with decoder d; None when the search cannot reach the
    end."""
    pcm = _pcm(x)
    if _word_pass(d, pcm, words) is None:
        return None
    try:
        d.set_alignment()
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        alignment = d.get_alignment()
    except RuntimeError:
        return None
    if alignment is None:
        return None
    out = []
    for w in alignment:
        phones = [
            Phone(_label(p.name), offset + p.start * FRAME_S, offset + (p.start + p.duration) * FRAME_S) for p in w
        ]
        name = SIL if w.name.startswith(("<", "+", "[")) else re.sub(r"\(\d+\)$", "", w.name)
        out.append(Word(name, offset + w.start * FRAME_S, offset + (w.start + w.duration) * FRAME_S, phones))
    return out if any(w.word != SIL for w in out) else None


def _recognise(d: Any, x: np.ndarray, offset: float) -> list[Phone]:
    d.start_utt()
    d.process_raw(_pcm(x), full_utt=True)
    d.end_utt()
    return [
        Phone(_label(s.word), offset + s.start_frame * FRAME_S, offset + (s.end_frame + 1) * FRAME_S) for s in d.seg()
    ]


def _chunks(x: np.ndarray, max_s: float = CHUNK_S) -> list[tuple[int, int]]:
    """Sample ranges of at most max_s, cut at the quietest pause in the second half of each."""
    n, step, hop = len(x), int(max_s * SR), SR // 100
    if n <= step:
        return [(0, n)]
    active = voice_activity(x, SR, fps=100.0, hangover_s=0.0)
    level = np.abs(x[: (n // hop) * hop]).reshape(-1, hop).mean(axis=1)
    cuts = [0]
    while n - cuts[-1] > step:
        a, b = (cuts[-1] + step // 2) // hop, min((cuts[-1] + step) // hop, len(level), len(active))
        quiet = np.flatnonzero(~active[a:b])
        cand = quiet if len(quiet) else np.arange(b - a)
        cuts.append(int(a + cand[np.argmin(level[a:b][cand])]) * hop + hop // 2)
    return list(zip(cuts, cuts[1:] + [n], strict=True))


def _silent(x: np.ndarray) -> bool:
    return len(x) < SR // 10 or not voice_activity(x, SR, fps=100.0).any()


def _share_words(x: np.ndarray, chunks: list[tuple[int, int]], n_words: int) -> np.ndarray:
    """Word index where each chunk starts, in proportion to its speech time (a fair guess at a speaking rate)."""
    speech = np.array([max(voice_activity(x[a:b], SR, fps=100.0).sum(), 1) for a, b in chunks], float)
    return np.round(np.concatenate([[0], np.cumsum(speech)]) / speech.sum() * n_words).astype(int)


def _align_block(d: Any, x: np.ndarray, words: list[str], offset: float) -> list[Word]:
    """Align up to BLOCK_S of audio: one word-level pass over all of it, then the phone-level pass in pieces of
    at most CHUNK_S cut at the pauses it found (the phone pass costs time and memory superlinear in length)."""
    dur = len(x) / SR
    pieces: list[tuple[int, int, list[str]]] = [(0, len(x), words)]
    if dur > CHUNK_S:
        segs = _word_pass(d, _pcm(x), words)
        if segs is None:
            chunks = _chunks(x)
            edges = _share_words(x, chunks, len(words))
            pieces = [(a, b, words[lo:hi]) for (a, b), lo, hi in zip(chunks, edges[:-1], edges[1:], strict=True)]
        else:
            pieces, start, cur = [], 0, []
            for i, (w, f0, f1) in enumerate(segs):
                is_sil = w.startswith(("<", "+", "["))
                long_enough = (f0 * 160 - start) / SR >= CHUNK_S / 2
                too_long = i + 1 < len(segs) and (segs[i + 1][2] * 160 - start) / SR > CHUNK_S
                if cur and (is_sil and long_enough or too_long):
                    cut = (f0 + f1 + 1) // 2 * 160 if is_sil else (f1 + 1) * 160
                    pieces.append((start, cut, cur))
                    start, cur = cut, []
                if not is_sil:
                    cur.append(w)
            pieces.append((start, len(x), cur))
    out: list[Word] = []
    for a, b, ws in pieces:
        part = _force_align(d, x[a:b], ws, offset + a / SR) if ws else None
        if part is None:
            if ws:
                log("align: text does not fit the audio here; recognising phones instead")
            part = [Word("", offset + a / SR, offset + b / SR, _recognise(_phone_decoder(), x[a:b], offset + a / SR))]
        out += part
    return out


def align_words(audio16k: np.ndarray, text: str) -> list[Word]:
    """Forced alignment of `text` to the speech: words (SIL for pauses), each with its phones.

    Audio longer than BLOCK_S is cut at pauses into blocks and the words shared out in proportion to each
    block's speech time, so a mismatch only costs accuracy near block edges. Where the aligner cannot fit the
    words, that stretch falls back to phone recognition (a Word with an empty name).
    """
    x = np.asarray(audio16k, np.float32).ravel()
    dur = len(x) / SR
    if len(x) == 0:
        return []
    if _silent(x):
        return [Word(SIL, 0.0, dur, [Phone(SIL, 0.0, dur)])]
    d = _align_decoder()
    words = _known_words(d, text_to_words(text))
    if not words:
        return [Word("", 0.0, dur, _phone_loop(x))]
    blocks = _chunks(x, BLOCK_S)
    if len(blocks) == 1:
        return _align_block(d, x, words, 0.0)
    edges = _share_words(x, blocks, len(words))
    out: list[Word] = []
    for (a, b), lo, hi in track(list(zip(blocks, edges[:-1], edges[1:], strict=True)), "align"):
        out += _align_block(d, x[a:b], words[lo:hi], a / SR)
    return out


def recognise_words(audio16k: np.ndarray, thorough: bool = False) -> str:
    """The words heard in 16 kHz speech (large-vocabulary recognition in pieces cut at pauses; "" for none)."""
    x = np.asarray(audio16k, np.float32).ravel()
    if _silent(x):
        return ""
    chunks = _chunks(x)
    heard = []
    for a, b in track(chunks, "words") if len(chunks) > 1 else chunks:
        d = _word_decoder(thorough)
        d.start_utt()
        d.process_raw(_pcm(x[a:b]), full_utt=True)
        d.end_utt()
        if (hyp := d.hyp()) is not None:
            heard.append(hyp.hypstr)
    return " ".join(h for h in heard if h)


def align_phones(audio16k: np.ndarray, text: str | None = None, words: bool = True) -> list[Phone]:
    """Phones in 16 kHz mono speech: forced alignment of the text when it is known, else of the words recognised
    in it (unless not `words`), else a phone loop's.

    Recognised words, even wrong ones, carry the lexicon's constraints that a bare phone loop lacks: on natural
    English sentences their phones find more of the p/b/m and far fewer false ones. On speech that is not (another
    language, GRID's word lists) the language model's guesses cost p/b/m, and the phone loop does better
    (docs/articulation_engine.md). Silence gives [SIL] (empty audio gives []); long audio is decoded in chunks cut
    at pauses.
    """
    x = np.asarray(audio16k, np.float32).ravel()
    if len(x) == 0:
        return []
    if _silent(x):
        return [Phone(SIL, 0.0, len(x) / SR)]
    if text is None and words:
        text = recognise_words(x)
    if text and text_to_words(text):
        return [p for w in align_words(x, text) for p in w.phones]
    return _phone_loop(x)


def find_phones(audio16k: np.ndarray, text: str | None = None, words: bool = True) -> tuple[list[Phone], str | None]:
    """(align_phones ([] when it fails), the words it recognised: None when it was given the text or not asked for
    words). A dub runs this in processes of its own beside its face pass (pocketsphinx holds the GIL), on parts of
    the speech at once: `parts_at_pauses`, `join_found`."""
    heard = recognise_words(audio16k) if text is None and words else None
    try:
        return align_phones(audio16k, heard if heard is not None else text, words=False), heard
    except LipsyncError:
        return [], heard


def parts_at_pauses(audio16k: np.ndarray, n: int = 2) -> list[tuple[int, int]]:
    """Sample ranges to find phones in at once, in n processes (2 cores: more would only cost memory, ~0.35 GB a
    recogniser): about equal parts cut at pauses; one part for up to CHUNK_S of speech (a process costs ~1 s)."""
    x = np.asarray(audio16k, np.float32).ravel()
    cuts = [b for _, b in _chunks(x, max(CHUNK_S, len(x) / SR / (2 * n)))][:-1]  # candidates: pauses every so often
    if not cuts:
        return [(0, len(x))]
    edges = [0, *sorted({min(cuts, key=lambda c: abs(c - k * len(x) / n)) for k in range(1, n)}), len(x)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def join_found(parts: Sequence[tuple[float, tuple[list[Phone], str | None]]]) -> tuple[list[Phone] | None, str | None]:
    """find_phones' results on consecutive parts of one speech, each with its start (seconds), as one: (the phones,
    None when there is no speech sound among them to go by; the words recognised, None when none were asked for)."""
    found = [Phone(p.label, p.start + t, p.end + t) for t, (ph, _) in parts for p in ph]
    heard = [h for _, (_, h) in parts if h is not None]
    return (found if any(p.label != SIL for p in found) else None), (" ".join(h for h in heard if h) if heard else None)


def _phone_loop(x: np.ndarray) -> list[Phone]:
    """Phone recognition (no words: any phone may follow any other, weighted by a phone bigram)."""
    chunks = _chunks(x)
    pieces = track(chunks, "phones") if len(chunks) > 1 else chunks
    d = _phone_decoder()
    return [p for a, b in pieces for p in _recognise(d, x[a:b], a / SR)]


# ------------------------------------------------------------------ per video frame


def _frame_mask(phones: Sequence[Phone], labels: set[str], n_frames: int, fps: float, margin: float) -> np.ndarray:
    """Frames whose time i/fps falls in [start - margin, end + margin) of a matching phone; a phone too short
    to contain any frame time still marks its nearest frame, so no closure is lost between frames."""
    mask = np.zeros(n_frames, dtype=bool)
    for p in phones:
        if p.label not in labels or n_frames == 0:
            continue
        lo = int(np.ceil((p.start - margin) * fps - 1e-9))
        hi = int(np.ceil((p.end + margin) * fps - 1e-9))  # exclusive: phones are [start, end)
        if hi > lo:
            mask[max(lo, 0) : min(hi, n_frames)] = True
        else:
            mid = int(round((p.start + p.end) / 2 * fps))
            if 0 <= mid < n_frames:
                mask[mid] = True
    return mask


def bilabial_frames(phones: Sequence[Phone], n_frames: int, fps: float = 25.0, margin: float = 0.02) -> np.ndarray:
    """True per video frame while a P, B or M is articulated (lips closed), with a small margin."""
    return _frame_mask(phones, BILABIALS, n_frames, fps, margin)


def silence_frames(phones: Sequence[Phone], n_frames: int, fps: float = 25.0) -> np.ndarray:
    """True per video frame that no speech phone covers (pauses, and anything past the last phone)."""
    speech = {p.label for p in phones if p.label != SIL}
    return ~_frame_mask(phones, speech, n_frames, fps, 0.0)
