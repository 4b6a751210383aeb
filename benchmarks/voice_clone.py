"""Does voice conversion make the dub sound like the on-screen speaker, without hurting intelligibility?

Speakers, sentences and measures are the product's own (lipsync_cli/eval/voice.py): every shared clip with enough
speech (first 60% of its audio is the reference, the rest held out), musetalk_eng.wav (same split) and GRID s1
(10 sentences reference, 10 others held out). Piper speaks a few fixed sentences; each conversion variant moves
them towards the reference and we report, per speaker and on average:

* sim: GE2E (resemblyzer) cosine to the speaker's HELD-OUT speech (the bar: >= +0.10 over raw TTS on average);
  `in` is the cosine to the reference itself (what "shape" optimises): a large in/out gap would mean it fits the
  reference excerpt, not the voice;
* WER: pocketsphinx word error rate (the bar: at most 10 points worse than raw TTS);
* two checks that do not use GE2E, since the same encoder family guides "shape" and scores it: the distance of
  the long-term average spectrum (40 mel bands, level removed, dB RMS) and of the median F0 (semitones) to the
  held-out speech;
* CPU seconds of conversion per second of speech (process time: the machine is shared, wall time is not).

    python benchmarks/voice_clone.py --out voice_clone.json [--methods shape,warp] [--clips 4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lipsync_cli.errors import LipsyncError  # noqa: E402
from lipsync_cli.eval.voice import (  # noqa: E402
    BAR_SIMILARITY,
    BAR_WER,
    SENTENCES,
    grid_speaker,
    media_speakers,
    transcribe,
    tts,
    wer,
)
from lipsync_cli.voice import convert as vc  # noqa: E402
from lipsync_cli.voice.speaker import SR, similarity, speaker_embedding, speech_only  # noqa: E402

SHARED = ROOT.parent / "shared"
# column -> convert() arguments
VARIANTS = {
    "f0": dict(method="f0"),
    "warp": dict(method="warp"),
    "shape": dict(method="shape"),
    "shape a=1": dict(method="shape", alpha=1.0),  # ablation: EQ + shaping gain, no formant warp
}


def ltas(x: np.ndarray) -> np.ndarray:
    """Long-term average spectrum of the speech frames: 40 mel bands, dB, overall level removed."""
    import librosa

    x = speech_only(x, min_seconds=0.5)
    db = 10 * np.log10(librosa.feature.melspectrogram(y=x, sr=SR, n_fft=400, hop_length=160, n_mels=40).mean(1))
    return db - db.mean()


def median_f0(x: np.ndarray) -> float:
    f0 = vc.analyse(x)[0]
    return float(np.median(f0[f0 > 0]))


_raw_wer: dict[str, float] = {}


def measures(y: np.ndarray, text: str, held: dict, ref_emb: np.ndarray, raw: bool = False) -> dict[str, float]:
    e = speaker_embedding(y)
    if raw and text in _raw_wer:  # the raw TTS is the same for every speaker: transcribe it once
        w = _raw_wer[text]
    else:
        w = 100 * wer(text, transcribe(y))
        if raw:
            _raw_wer[text] = w
    return {
        "sim": similarity(e, held["emb"]),
        "in": similarity(e, ref_emb),
        "wer": w,
        "ltas_db": float(np.sqrt(np.mean((ltas(y) - held["ltas"]) ** 2))),
        "f0_st": float(abs(12 * np.log2(median_f0(y) / held["f0"]))),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write all results as JSON here")
    ap.add_argument("--methods", default=",".join(VARIANTS), help=f"comma list from {list(VARIANTS)}")
    ap.add_argument("--clips", type=int, default=None, help="only the first N media clips")
    args = ap.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"shared media absent: {SHARED}")
    import torch

    torch.set_num_threads(1)  # GE2E on tiny batches: threads only spin on a shared machine (as in convert)
    variants = [m for m in args.methods.split(",") if m]
    texts = list(SENTENCES)
    raw = [tts(s) for s in texts]
    audio_s = sum(len(x) for x in raw) / SR
    skipped: list[tuple[str, str]] = []
    speakers = media_speakers(SHARED / "media", args.clips, skipped)
    speakers += media_speakers(SHARED / "speech" / "musetalk_eng.wav")
    grid = grid_speaker(SHARED / "corpus/grid/s1")
    speakers += [grid] if grid is not None else []

    rows, cpu = [], dict.fromkeys(variants, 0.0)
    for sp in speakers:
        try:
            prof = vc.voice_profile(sp.reference)
            held = {"emb": speaker_embedding(sp.held_out), "ltas": ltas(sp.held_out), "f0": median_f0(sp.held_out)}
        except LipsyncError as e:
            skipped.append((sp.name, str(e)))
            print(f"skip {sp.name}: {e}")
            continue
        row = {"name": sp.name, "ref_s": prof.speech_seconds, "f0_hz": float(np.exp(prof.f0_mean_log))}
        row["real"] = similarity(prof.embedding, held["emb"])
        for col in ["raw", *variants]:
            per = []
            for s, x in zip(texts, raw, strict=True):
                if col == "raw":
                    y = x
                else:
                    t0 = sum(os.times()[:2])
                    y = vc.convert(x, prof, **VARIANTS[col])
                    cpu[col] += sum(os.times()[:2]) - t0
                    assert len(y) == len(x)
                per.append(measures(y, s, held, prof.embedding, raw=col == "raw"))
            row[col] = {k: float(np.mean([m[k] for m in per])) for k in per[0]}
        rows.append(row)
        print(f"  {sp.name}: " + " ".join(f"{c} {row[c]['sim']:.3f}" for c in ["raw", *variants]), flush=True)

    cols = ["raw", *variants]
    mean = {c: {k: float(np.mean([r[c][k] for r in rows])) for k in rows[0]["raw"]} for c in cols}
    head = f"{'speaker':26s} {'ref s':>5s} {'F0':>4s} {'real':>5s} | " + " ".join(f"{c:>12s}" for c in cols)
    print(
        f"\nGE2E similarity to held-out speech (per-sentence mean; gain over raw TTS in brackets); {len(rows)} speakers"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows + [{"name": "MEAN", "ref_s": np.nan, "f0_hz": np.nan, "real": np.nan, **mean}]:
        cells = [f"{r['raw']['sim']:12.3f}"] + [
            f"{r[c]['sim']:.3f}({r[c]['sim'] - r['raw']['sim']:+.3f})" for c in variants
        ]
        print(
            f"{r['name'][:26]:26s} {r['ref_s']:5.1f} {r['f0_hz']:4.0f} {r['real']:5.3f} | "
            + " ".join(f"{c:>12s}" for c in cells)
        )
    print("\nmeans over speakers:")
    print(f"{'':10s} {'sim':>6s} {'in':>6s} {'WER %':>6s} {'LTAS dB':>8s} {'F0 st':>6s} {'CPU s/s':>8s}")
    for c in cols:
        m = mean[c]
        rtf = cpu[c] / (audio_s * len(rows)) if c in cpu else 0.0
        line = (
            f"{c:10s} {m['sim']:6.3f} {m['in']:6.3f} {m['wer']:6.1f} {m['ltas_db']:8.2f} {m['f0_st']:6.2f} {rtf:8.3f}"
        )
        print(line)
    verdicts = {}
    for c in variants:
        gain, dw = mean[c]["sim"] - mean["raw"]["sim"], mean[c]["wer"] - mean["raw"]["wer"]
        verdicts[c] = {"gain": gain, "wer_change": dw, "meets_bar": bool(gain >= BAR_SIMILARITY and dw <= BAR_WER)}
        ok = "MEETS" if verdicts[c]["meets_bar"] else "misses"
        print(
            f"{c:10s}: similarity {gain:+.3f}, WER {dw:+.1f} points -> {ok} the bar "
            f"(+{BAR_SIMILARITY}, <= +{BAR_WER:g})"
        )
    if args.out:
        load = os.getloadavg()
        args.out.write_text(
            json.dumps(
                {
                    "sentences": texts,
                    "variants": {c: VARIANTS[c] for c in variants},
                    "mean": mean,
                    "verdict": verdicts,
                    "cpu_s_per_s": {c: cpu[c] / (audio_s * len(rows)) for c in variants},
                    "loadavg": load,
                    "speakers": rows,
                    "skipped": [{"speaker": n, "why": w} for n, w in skipped],
                },
                indent=1,
            )
        )
        print(f"results -> {args.out}")


if __name__ == "__main__":
    main()
