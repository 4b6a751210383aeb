"""Reports of the `text` protocol: the table (terminal and HTML), per-clip frame strips labelled with the word and
phone on screen, the mouth-gap curves with p/b/m and open vowels marked, and metrics.json."""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lipsync_cli import progress
from lipsync_cli.eval import articulation, text_protocol
from lipsync_cli.eval.report import img_tag, pyplot, slug
from lipsync_cli.files import json_safe

ARROW = {"high": "↑", "low": "↓", "one": "→1", "": ""}
STRIP_FRAMES = 20  # consecutive frames in a strip (0.8 s at 25 fps): long enough to see closures open and shut
GREEN, RED, GREY = (40, 170, 40), (220, 40, 40), (150, 150, 150)


def _fmt(v: float, fmt: str) -> str:
    return "–" if v is None or not np.isfinite(v) else fmt.format(v)


def print_text_report(run: text_protocol.TextRun, console: Console | None = None) -> None:
    console = console or progress.console
    if not run.results:
        console.print("[yellow]nothing measured[/]")
    for title, clips in [("mean over clips", None), *[(c, c) for c in run.clips]]:
        means = run.means() if clips is None else run.clip_means(clips)
        table = Table(title=f"articulation · {title}", title_justify="left")
        table.add_column("row")
        for _k, label, better, _f in text_protocol.COLUMNS:
            table.add_column(f"{label} {ARROW[better]}".strip(), justify="right")
        for row in run.rows:
            if means.get(row):
                table.add_row(row, *[_fmt(means[row].get(k, np.nan), f) for k, _l, _b, f in text_protocol.COLUMNS])
        console.print(table)
    for what, why in run.skipped:
        console.print(f"[yellow]skipped[/] {escape(f'{what}: {why}')}")


# ----------------------------------------------------------------------------- figures


def _strip_start(res: text_protocol.RowResult, n: int = STRIP_FRAMES) -> int:
    """First frame of the strip: where the n-frame window holds the most p/b/m and open-vowel phones."""
    kinds = np.zeros(len(res.gap))
    for d in res.phones:
        if d["kind"] in ("bilabial", "open"):
            kinds[
                articulation.phone_frames(articulation.Phone(d["label"], d["start"], d["end"]), len(res.gap), res.fps)
            ] += 1
    if len(kinds) <= n:
        return 0
    return int(np.argmax(np.convolve(kinds, np.ones(n), "valid")))


def _labels(res: text_protocol.RowResult) -> list[tuple[str, str]]:
    out = [("", "")] * len(res.gap)
    for w in res.words:
        for p in w.phones:
            for i in articulation.phone_frames(p, len(res.gap), res.fps):
                out[i] = ("" if w.word == articulation.SIL else w.word, "" if p.label == articulation.SIL else p.label)
    return out


def frame_strip(res: text_protocol.RowResult, n: int = STRIP_FRAMES) -> np.ndarray | None:
    """One row of n consecutive output mouths, each captioned with its phone and gap (the word above its first
    frame). A p/b/m frame is framed green when the lips are shut (gap < CLOSED), red when not."""
    if res.mouths is None or not len(res.mouths):
        return None
    a = _strip_start(res, n)
    labels = _labels(res)
    tiles = []
    for i in range(a, min(a + n, len(res.mouths), len(res.gap))):
        m = res.mouths[i]
        h, w = m.shape[:2]
        tile = np.full((h + 40, w, 3), 255, np.uint8)
        tile[20 : 20 + h] = m
        word, ph = labels[i]
        g = res.gap[i]
        if ph in articulation.BILABIALS:
            colour = GREEN if np.isfinite(g) and g < articulation.CLOSED else RED
            cv2.rectangle(tile, (0, 20), (w - 1, 19 + h), colour, 3)
        if word and (i == a or labels[i - 1][0] != word):
            cv2.putText(tile, word[:9], (2, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.putText(tile, ph or "-", (2, h + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        txt = "-" if not np.isfinite(g) else f"{g:.3f}"
        cv2.putText(tile, txt, (w - 40, h + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.34, GREY, 1, cv2.LINE_AA)
        tiles.append(np.pad(tile, ((0, 0), (0, 2), (0, 0)), constant_values=255))
    return np.concatenate(tiles, axis=1) if tiles else None


def clip_strips(run: text_protocol.TextRun, clip: str) -> np.ndarray | None:
    """The clip's strips stacked: one per row (first sentence; real: its own speech), each titled."""
    parts = []
    for row in run.rows:
        res = next((r for r in run.results if r.clip == clip and r.row == row and r.sentence <= 0), None)
        strip = frame_strip(res) if res is not None else None
        if strip is None:
            continue
        title = np.full((22, strip.shape[1], 3), 255, np.uint8)
        what = "own speech" if res.sentence < 0 else f'"{run.sentences[res.sentence]}"'
        s = res.scores
        b, c = _fmt(s["bilabial"], "{:.2f}"), _fmt(s["contrast"], "{:.2f}")
        line = f"{row}: {what[:90]}   bilabial {b}  contrast {c}"
        cv2.putText(title, line, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        parts += [title, strip]
    if not parts:
        return None
    width = max(p.shape[1] for p in parts)
    return np.concatenate([np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in parts])


def save_image(img: np.ndarray, path: Path, quality: int = 85) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), bgr, params):
        raise OSError(f"could not write {path}")
    return path


def plot_gaps(run: text_protocol.TextRun, clip: str, path: Path) -> Path | None:
    """Mouth gap over time per row (first sentence; real: own speech): p/b/m spans red, open vowels green, the
    closed and at-rest thresholds dashed, each p/b/m phone's smallest gap (+-1 frame) dotted."""
    results = [r for row in run.rows for r in run.results if r.clip == clip and r.row == row and r.sentence <= 0]
    if not results:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 1, figsize=(11, 1.9 * len(results) + 0.4), squeeze=False)
    for ax, res in zip(axes[:, 0], results, strict=True):
        t = np.arange(len(res.gap)) / res.fps
        for d in res.phones:
            if d["kind"] == "bilabial":
                ax.axvspan(d["start"], d["end"], color="tab:red", alpha=0.25, lw=0)
                if np.isfinite(d["gap_min"]):
                    ax.plot((d["start"] + d["end"]) / 2, d["gap_min"], "o", ms=3,
                            color="tab:green" if d.get("closed") else "tab:red")  # fmt: skip
            elif d["kind"] == "open":
                ax.axvspan(d["start"], d["end"], color="tab:green", alpha=0.15, lw=0)
        ax.plot(t, res.gap, color="black", lw=1)
        ax.axhline(articulation.CLOSED, color="tab:red", ls="--", lw=0.8)
        ax.axhline(articulation.SILENT_OPEN, color="tab:gray", ls=":", lw=0.8)
        for w in res.words:
            if w.word and w.word != articulation.SIL:
                ax.text((w.start + w.end) / 2, 1.0, w.word, transform=ax.get_xaxis_transform(), ha="center",
                        va="bottom", fontsize=7)  # fmt: skip
        s = res.scores
        ax.set_ylabel(res.row, fontsize=8)
        ax.set_xlim(0, max(t[-1] if len(t) else 1, 0.1))
        ax.set_ylim(0, max(0.12, float(np.nanmax(res.gap)) * 1.1 if np.isfinite(res.gap).any() else 0.12))
        ax.text(0.995, 0.92, f"bilabial {_fmt(s['bilabial'], '{:.2f}')}  contrast {_fmt(s['contrast'], '{:.2f}')}"
                f"  silence {_fmt(s['silence'], '{:.2f}')}", transform=ax.transAxes, ha="right", va="top",
                fontsize=8)  # fmt: skip
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("seconds (red: p/b/m, green: open vowels; dashed: closed, dotted: at rest)", fontsize=8)
    fig.suptitle(f"{clip}: mouth gap of the output, re-tracked", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files


def to_json(run: text_protocol.TextRun) -> dict:
    return json_safe(
        {
            "rows": {
                r: {"engine": text_protocol.ROWS[r][0], **text_protocol.ROWS[r][1]}
                if r in text_protocol.ROWS
                else "own footage"
                for r in run.rows
            },
            "sentences": run.sentences,
            "means": run.means(),
            "clips": {c: run.clip_means(c) for c in run.clips},
            "info": run.info,
            "results": [
                {
                    "clip": r.clip,
                    "row": r.row,
                    "sentence": r.sentence,
                    "seconds": r.seconds,
                    "scores": r.scores,
                    "phones": r.phones,
                }
                for r in run.results
            ],  # fmt: skip
            "skipped": run.skipped,
        }
    )


def _html_table(run: text_protocol.TextRun, means: dict) -> str:
    head = "".join(f"<th>{html.escape(label)} {ARROW[b]}</th>" for _k, label, b, _f in text_protocol.COLUMNS)
    body = "".join(
        f"<tr><th>{html.escape(row)}</th>"
        + "".join(f"<td>{_fmt(means[row].get(k, np.nan), f)}</td>" for k, _l, _b, f in text_protocol.COLUMNS)
        + "</tr>"
        for row in run.rows
        if means.get(row)
    )
    return f"<table><tr><th>row</th>{head}</tr>{body}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th:first-child{text-align:left}img{max-width:100%;margin:.4em 0}.note{color:#666;font-size:13px}"""


def _method() -> str:
    a, w = articulation, ", ".join(map(str, text_protocol.WARP_POINTS))
    return (
        "Measured on the output video: re-tracked with the face mesh, the sentence force-aligned to its audio. "
        f"bilabial: p/b/m with gap < {a.CLOSED} within ±1 frame; contrast: (open-vowel gap + {a.EPS}) / (p/b/m "
        f"smallest gap + {a.EPS}); silence: pause frames (≥ {a.PAUSE_S} s, {a.EDGE} trimmed each end) with gap < "
        f"{a.SILENT_OPEN}; warp: largest shift of nose and cheek points (mesh {w}) over the outer-eye distance."
    )


def write_text_report(run: text_protocol.TextRun, out_dir: Path) -> Path:
    """metrics.json, per clip a frame strip (JPEG) and gap plot (PNG), and index.html in out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(to_json(run), indent=1))
    rows = ", ".join(
        f"{r} = {text_protocol.ROWS[r][0]} {text_protocol.ROWS[r][1]}"
        if r in text_protocol.ROWS
        else f"{r} = own footage"
        for r in run.rows
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>lipsync eval: articulation</title>",
        f"<style>{CSS}</style></head><body><h1>lipsync eval: articulation (text protocol)</h1>",
        f"<p class='note'>{datetime.datetime.now():%Y-%m-%d %H:%M} · rows: {html.escape(rows)} · "
        "<a href='metrics.json'>metrics.json</a></p>",
        f"<p class='note'>{html.escape(_method())} Sentences: "
        + " · ".join(html.escape(s) for s in run.sentences) + "</p>",
        "<h2>mean over clips</h2>", _html_table(run, run.means()),
    ]  # fmt: skip
    for clip in run.clips:
        name = slug(clip)
        parts.append(f"<h2>{html.escape(clip)}</h2>")
        parts.append(f"<p class='note'>{html.escape(json.dumps(run.info.get(clip, {})))}</p>")
        parts.append(_html_table(run, run.clip_means(clip)))
        strip = clip_strips(run, clip)
        if strip is not None:
            parts.append(img_tag(save_image(strip, out_dir / f"strip_{name}.png")))
        png = plot_gaps(run, clip, out_dir / f"gap_{name}.png")
        if png is not None:
            parts.append(img_tag(png))
    parts.append("<h2>notes</h2><ul>")
    parts += [f"<li>skipped {html.escape(w)}: {html.escape(y)}</li>" for w, y in run.skipped]
    parts.append("</ul></body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
