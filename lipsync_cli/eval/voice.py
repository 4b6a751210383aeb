"""`lipsync eval --metric voice`: does the dub speak in the on-screen person's voice, and can it still be understood?

Speakers: each shared clip (the first 60% of its audio is the reference the voice is learned from, the rest is
held out, as in the reconstruct protocol) and a GRID speaker (the first REF_SENTENCES sentences are the reference,
HELD_SENTENCES from the middle of the corpus are held out). Piper speaks a few fixed sentences, the product's own
conversion (voice.speech.learn_voice on the reference, then apply_voice: what dub runs) moves them into the
voice, and for the raw TTS and the converted speech we measure

* similarity: cosine of GE2E (resemblyzer) embeddings between the speech and the speaker's HELD-OUT speech, never
  the reference itself (that would reward copying the reference's microphone and room, not the voice). `real` is
  the speaker's reference speech against the same held-out speech: what the same person scores, the ceiling;
* WER: pocketsphinx (en-us acoustic model and language model from its wheel) word error rate against the sentence;
* two checks that do not use GE2E (the default conversion fits its shaping gain through the GE2E encoder, so that
  encoder is not an independent judge): the distance of the long-term average spectrum (40 mel bands, dB, level
  removed) and of the median F0 (semitones) to the held-out speech;
* pitch fidelity: the share of voiced frames within a semitone of the pitch the conversion aimed at, and their mean
  signed deviation (`pitch_fidelity`): the conversion's own pitch error.

The issue's bar: on the shared clips, converted speech >= BAR_SIMILARITY more similar than raw TTS on average,
with WER at most BAR_WER points worse. benchmarks/voice_clone.py compares conversion variants with these functions.
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from rich.box import SIMPLE_HEAD
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lipsync_cli import media, progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.files import VIDEO_EXT, json_safe
from lipsync_cli.phones import recognise_words
from lipsync_cli.settings import Settings
from lipsync_cli.voice.speaker import SR, mel_frames, similarity, speaker_embedding, speech_only

if TYPE_CHECKING:
    from lipsync_cli.voice.convert import VoiceProfile

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "We need to finish the project before the end of the month.",
    "Please call me tomorrow morning at the office.",
)
REF_FRACTION = 0.6  # shared clips: the first 60% of the audio is the reference (as in the reconstruct protocol)
REF_SENTENCES = 10  # GRID: the first ten sentences are the reference (~13 s of speech) ...
HELD_SENTENCES = 10  # ... and ten from the middle of the corpus are held out
BAR_SIMILARITY, BAR_WER = 0.10, 10.0


# ----------------------------------------------------------------------------- measures


def wer(ref: str, hyp: str) -> float:
    """Word error rate (substitutions + insertions + deletions over reference words), case/punctuation blind."""
    r, h = (re.sub(r"[^a-z' ]+", " ", s.lower()).split() for s in (ref, hyp))
    d = np.arange(len(h) + 1)
    for i, rw in enumerate(r, 1):
        prev, d = d, np.empty_like(d)
        d[0] = i
        for j, hw in enumerate(h, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (rw != hw))
    return float(d[-1]) / max(len(r), 1)


def transcribe(x: np.ndarray) -> str:
    """pocketsphinx's best hypothesis for 16 kHz speech (large-vocabulary decoding at its default settings, a new
    recogniser each time: a WER should not depend on what was transcribed before)."""
    return recognise_words(x, thorough=True)


def tts(text: str) -> np.ndarray:
    """The dub's own TTS (piper, the bundled voice) at 16 kHz."""
    from lipsync_cli.voice.tts import synthesize

    return synthesize(text, sr=SR, progress=False)


def f0_track(x: np.ndarray) -> np.ndarray:
    """F0 per 5 ms frame (0 where unvoiced), by the same WORLD analysis the conversion uses."""
    from lipsync_cli.voice.convert import analyse

    return analyse(x)[0]


def ltas(x: np.ndarray) -> np.ndarray:
    """Long-term average spectrum of the speech frames: 40 mel bands in dB, overall level removed."""
    db = 10 * np.log10(mel_frames(speech_only(x, min_seconds=0.5)).mean(0) + 1e-10)
    return db - db.mean()


def ltas_distance(x: np.ndarray, target: np.ndarray) -> float:
    """RMS dB difference between the long-term spectra of `x` and of the target speech (`ltas(target)`)."""
    return float(np.sqrt(np.mean((ltas(x) - target) ** 2)))


def median_f0(x: np.ndarray) -> float:
    f0 = f0_track(x)
    return float(np.median(f0[f0 > 0])) if (f0 > 0).any() else float("nan")


def f0_distance(x: np.ndarray, target_hz: float) -> float:
    """|median F0 of x - the target's| in semitones."""
    return float(abs(12 * np.log2(median_f0(x) / target_hz)))


def pitch_fidelity(f0: np.ndarray, converted: np.ndarray, profile: VoiceProfile) -> tuple[float, float]:
    """How the converted speech follows the pitch the conversion meant to give it (`convert.map_f0` of the TTS's
    contour `f0`, its `f0_track`), over the frames voiced in all three: the share within a semitone of it, and the
    mean signed deviation (semitones). Unlike the median-F0 distance to held-out speech, this is the conversion's own
    error, without the TTS's intonation in it, and it sees a voice that kept the TTS's period (an octave low)."""
    from lipsync_cli.voice.convert import map_f0

    want, got = map_f0(f0, profile), f0_track(converted)
    n = min(len(want), len(got))
    both = (f0[:n] > 0) & (want[:n] > 0) & (got[:n] > 0)
    if not both.any():
        return float("nan"), float("nan")
    st = 12 * np.log2(got[:n][both] / want[:n][both])
    return float(np.mean(np.abs(st) < 1.0)), float(np.mean(st))


# ----------------------------------------------------------------------------- speakers


@dataclass
class Speaker:
    name: str
    group: str  # "media" | "grid" | "speech"
    reference: np.ndarray  # what the voice is learned from
    held_out: np.ndarray  # what similarity is measured against


def read_audio(path: Path) -> np.ndarray:
    return media.read_audio(path, SR)


def media_speakers(folder: Path, limit: int | None = None, skipped: list | None = None) -> list[Speaker]:
    """Each clip with an audio track: reference = its first REF_FRACTION, held out = the rest."""
    paths = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_EXT)
    out = []
    for p in paths[:limit]:
        try:
            a = read_audio(p)
        except LipsyncError as e:  # no audio track: nothing to learn a voice from
            if skipped is not None:
                skipped.append((p.stem, str(e)))
            continue
        k = int(REF_FRACTION * len(a))
        out.append(Speaker(p.stem, "media", a[:k], a[k:]))
    return out


def grid_speaker(root: Path) -> Speaker | None:
    """A GRID speaker: the first REF_SENTENCES sentences as reference, HELD_SENTENCES from the middle held out."""
    clips = sorted((root / "video").glob("*.mpg"))
    if len(clips) < 2 * (REF_SENTENCES + HELD_SENTENCES):
        return None
    mid = len(clips) // 2
    ref = np.concatenate([read_audio(p) for p in clips[:REF_SENTENCES]])
    held = np.concatenate([read_audio(p) for p in clips[mid : mid + HELD_SENTENCES]])
    return Speaker(f"grid_{root.name}", "grid", ref, held)


# ----------------------------------------------------------------------------- the run


@dataclass
class SpeakerScores:
    name: str
    group: str
    ref_s: float  # seconds of speech in the reference
    f0_hz: float  # the speaker's median F0 (from the profile)
    real: float  # similarity of the reference speech itself to the held-out speech: the ceiling
    raw: list[float]  # per sentence: similarity of the raw TTS to the held-out speech
    converted: list[float]  # ... and of the converted TTS
    raw_wer: list[float]
    converted_wer: list[float]
    raw_ltas_db: list[float]  # long-term spectrum distance to the held-out speech, dB
    converted_ltas_db: list[float]
    raw_f0_st: list[float]  # median F0 distance to the held-out speech, semitones
    converted_f0_st: list[float]
    on_pitch: list[float]  # share of voiced frames within a semitone of the pitch the conversion aimed at
    pitch_bias_st: list[float]  # their mean signed deviation from it, semitones
    seconds: float  # conversion CPU time (this process, all threads), all sentences


@dataclass
class VoiceRun:
    sentences: list[str]
    speakers: list[SpeakerScores]
    skipped: list[tuple[str, str]]  # (speaker, why)
    method: str
    tts_seconds: float  # total seconds of TTS audio per speaker
    examples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def groups(self) -> list[str]:
        return list(dict.fromkeys(s.group for s in self.speakers))

    def summary(self, group: str | None = None) -> dict[str, float]:
        """Means over speakers (each the mean over its sentences); WER in percent."""
        rows = [s for s in self.speakers if group is None or s.group == group]
        if not rows:
            return {}

        def mean(key: str, scale: float = 1.0) -> float:
            return scale * float(np.mean([np.mean(getattr(s, key)) for s in rows]))

        m = {k: mean(k) for k in ("raw", "converted", "real")}
        w = {k: mean(k, 100.0) for k in ("raw_wer", "converted_wer")}
        w |= {k: mean(k) for k in ("raw_ltas_db", "converted_ltas_db", "raw_f0_st", "converted_f0_st")}
        w |= {"on_pitch": mean("on_pitch", 100.0), "pitch_bias_st": mean("pitch_bias_st")}
        gain, dw = m["converted"] - m["raw"], w["converted_wer"] - w["raw_wer"]
        meets = gain >= BAR_SIMILARITY and dw <= BAR_WER
        return {**m, **w, "gain": gain, "wer_change": dw, "speakers": len(rows), "meets_bar": float(meets)}


def evaluate_voice(
    settings: Settings,
    videos: Path | None = None,
    grid: Path | None = None,
    limit: int | None = None,
    texts: list[str] | None = None,
    with_grid: bool = True,
) -> VoiceRun:
    """Raw TTS vs converted, every speaker: similarity to held-out speech and WER. Speakers without usable speech
    are skipped with the reason, never fatal. The GRID speaker is --grid, else the one the eval protocols find."""
    from lipsync_cli.eval.protocols import grid_root
    from lipsync_cli.voice.convert import DEFAULT_METHOD
    from lipsync_cli.voice.speech import apply_voice, learn_voice

    texts = list(texts or SENTENCES)
    piper = settings.with_overrides(tts="piper")  # the conversion is measured on piper's speech (see tts())
    videos = videos if videos is not None else settings.shared_dir / "media"
    if not videos.exists():
        raise LipsyncError(f"no such folder: {videos}")
    skipped: list[tuple[str, str]] = []
    speakers = media_speakers(videos, limit, skipped)
    root = grid_root(settings, grid) if with_grid else None
    g = grid_speaker(root) if root is not None else None
    speakers += [g] if g is not None else []
    if not speakers:
        raise LipsyncError(f"no speech to evaluate the voice on in {videos}")

    raw = [tts(t) for t in texts]
    raw_wer = [wer(t, transcribe(x)) for t, x in zip(texts, raw, strict=True)]
    raw_emb = [speaker_embedding(x) for x in raw]
    raw_f0 = [f0_track(x) for x in raw]  # the TTS's pitch contours: once, not once per speaker
    run = VoiceRun(texts, [], skipped, DEFAULT_METHOD, sum(len(x) for x in raw) / SR)
    with progress.task("eval voice", len(speakers)) as advance:
        for sp in speakers:
            try:
                target = speaker_embedding(sp.held_out)
                target_ltas, target_f0 = ltas(sp.held_out), median_f0(speech_only(sp.held_out))
                voice = learn_voice(sp.reference, sp.name, piper)  # dub's own path, as `lipsync voice` runs it
                profile = voice.profile
            except LipsyncError as e:
                run.skipped.append((sp.name, str(e)))
                advance(1)
                continue
            t0 = time.process_time()  # CPU: wall time says more about the machine's other load than about this
            conv = [apply_voice(x, voice) for x in raw]
            seconds = time.process_time() - t0
            pitch = [pitch_fidelity(f, y, profile) for f, y in zip(raw_f0, conv, strict=True)]
            run.speakers.append(
                SpeakerScores(
                    name=sp.name,
                    group=sp.group,
                    ref_s=profile.speech_seconds,
                    f0_hz=float(np.exp(profile.f0_mean_log)),
                    real=similarity(profile.embedding, target),
                    raw=[similarity(e, target) for e in raw_emb],
                    converted=[similarity(speaker_embedding(y), target) for y in conv],
                    raw_wer=raw_wer,
                    converted_wer=[wer(t, transcribe(y)) for t, y in zip(texts, conv, strict=True)],
                    raw_ltas_db=[ltas_distance(x, target_ltas) for x in raw],
                    converted_ltas_db=[ltas_distance(y, target_ltas) for y in conv],
                    raw_f0_st=[f0_distance(x, target_f0) for x in raw],
                    converted_f0_st=[f0_distance(y, target_f0) for y in conv],
                    on_pitch=[p[0] for p in pitch],
                    pitch_bias_st=[p[1] for p in pitch],
                    seconds=seconds,
                )
            )
            run.examples[sp.name] = (raw[0], conv[0], sp.held_out)
            advance(1)
    for name, why in run.skipped:
        progress.log(f"[yellow]skipped[/] voice {escape(f'{name}: {why}')}")
    return run


# ----------------------------------------------------------------------------- report


HEAD = (
    "speaker", "ref s", "F0 Hz", "real", "raw TTS", "converted", "gain", "WER raw", "WER conv", "LTAS dB", "F0 st",
    "on pitch",
)  # fmt: skip


def _cells(name: str, m: dict, ref_s: str = "", f0: str = "") -> list[str]:
    return [
        name,
        ref_s,
        f0,
        f"{m['real']:.3f}",
        f"{m['raw']:.3f}",
        f"{m['converted']:.3f}",
        f"{m['converted'] - m['raw']:+.3f}",
        f"{m['raw_wer']:.1f}",
        f"{m['converted_wer']:.1f}",
        f"{m['raw_ltas_db']:.1f}→{m['converted_ltas_db']:.1f}",
        f"{m['raw_f0_st']:.1f}→{m['converted_f0_st']:.1f}",
        f"{m['on_pitch']:.0f}% ({m['pitch_bias_st']:+.1f} st)",
    ]


def rows(run: VoiceRun) -> list[list[str]]:
    """One row per speaker, then the mean of each group: the columns of HEAD (WER in %; raw→converted distances)."""
    out = []
    for s in run.speakers:
        m = {k: float(np.mean(v)) for k, v in asdict(s).items() if isinstance(v, list | float)}
        m["raw_wer"], m["converted_wer"], m["on_pitch"] = (100 * m[k] for k in ("raw_wer", "converted_wer", "on_pitch"))
        out.append(_cells(s.name, m, f"{s.ref_s:.1f}", f"{s.f0_hz:.0f}"))
    return out + [_cells(f"mean {g} ({run.summary(g)['speakers']})", run.summary(g)) for g in run.groups()]


def table(run: VoiceRun) -> Table:
    t = Table(
        title=f"voice ({run.method}): GE2E similarity to held-out speech of the speaker ↑, pocketsphinx WER % ↓, "
        "distances to held-out speech (raw→converted) ↓",
        title_justify="left",
        box=SIMPLE_HEAD,
    )
    for col in HEAD:
        t.add_column(col, justify="left" if col == "speaker" else "right", no_wrap=True)
    body = rows(run)
    for i, r in enumerate(body):
        t.add_row(*r, end_section=i == len(run.speakers) - 1)
    return t


def verdict(run: VoiceRun) -> str:
    """One line: the bar on the shared clips."""
    m = run.summary("media") or run.summary()
    if not m:
        return "no speaker could be evaluated"
    ok = "meets" if m["meets_bar"] else "misses"
    return (
        f"shared clips: similarity {m['gain']:+.3f} (bar +{BAR_SIMILARITY:.2f}), WER {m['wer_change']:+.1f} points "
        f"(bar <= +{BAR_WER:g}): {ok} the bar"
    )


def print_voice_report(run: VoiceRun, console: Console | None = None) -> None:
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    console.print(table(run))
    console.print(verdict(run))
    if run.speakers:
        rtf = sum(s.seconds for s in run.speakers) / (run.tts_seconds * len(run.speakers))
        console.print(f"[dim]conversion: {rtf:.2f} CPU s per second of speech[/]")


def plot_f0(run: VoiceRun, path: Path, cols: int = 4) -> Path | None:
    """One panel per speaker: F0 of raw and converted TTS (first sentence) over the speaker's own F0 distribution
    (held-out speech: median line, 10-90% band)."""
    if not run.examples:
        return None
    from lipsync_cli.eval.report import pyplot

    plt = pyplot()
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    names = list(run.examples)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.ravel(), names, strict=False):
        raw, conv, held = run.examples[name]
        target = f0_track(held[: 10 * SR])
        voiced = target[target > 0]
        if len(voiced):
            lo, mid, hi = np.percentile(voiced, [10, 50, 90])
            ax.axhspan(lo, hi, color="tab:blue", alpha=0.15, label="speaker 10-90%")
            ax.axhline(mid, color="tab:blue", lw=1, ls="--", label="speaker median")
        for x, colour, width, label in ((conv, "tab:red", 1.4, "converted"), (raw, "black", 0.8, "raw TTS")):
            f0 = f0_track(x)
            t = np.arange(len(f0)) * 0.005
            ax.plot(t, np.where(f0 > 0, f0, np.nan), color=colour, lw=width, label=label)
        ax.set_yscale("log")
        ax.set_ylim(55, 600)
        ax.yaxis.set_major_locator(FixedLocator([60, 100, 150, 200, 300, 500]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(name[:28], fontsize=9)
    for ax in axes.ravel()[len(names) :]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("F0 (Hz)")
    for ax in axes[-1]:
        ax.set_xlabel("time (s)")
    axes[0, 0].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"F0: raw TTS vs converted ({run.method}) vs each speaker's own F0, {run.sentences[0]!r}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def to_json(run: VoiceRun) -> dict:
    return json_safe(
        {
            "method": run.method,
            "sentences": run.sentences,
            "bar": {"similarity_gain": BAR_SIMILARITY, "wer_points": BAR_WER},
            "summary": {g: run.summary(g) for g in run.groups()},
            "speakers": [asdict(s) for s in run.speakers],
            "skipped": [{"speaker": n, "why": w} for n, w in run.skipped],
        }
    )


def write_voice_report(run: VoiceRun, out_dir: Path) -> Path:
    """voice.json, voice_f0.png and voice.html in out_dir; returns voice.html."""
    import html

    from lipsync_cli.eval.report import CSS, img_tag

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "voice.json").write_text(json.dumps(to_json(run), indent=1))
    png = plot_f0(run, out_dir / "voice_f0.png")
    head, body = HEAD, rows(run)
    cells = "<tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
    cells += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>lipsync eval: voice</title><style>{CSS}</style>",
        "</head><body><h1>lipsync eval: voice</h1>",
        f"<p class='note'>{html.escape(' '.join(__doc__.split(chr(10) + chr(10))[1].split()))}</p>",
        f"<p><b>{html.escape(verdict(run))}</b></p><table>{cells}</table>",
        img_tag(png) if png is not None else "",
        "<ul>" + "".join(f"<li>skipped {html.escape(n)}: {html.escape(w)}</li>" for n, w in run.skipped) + "</ul>",
        "</body></html>",
    ]
    index = out_dir / "voice.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
