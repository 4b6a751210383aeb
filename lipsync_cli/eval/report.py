"""The eval report: a rich table per protocol in the terminal and, with --report DIR, metrics.json, PNG plots,
side-by-side videos of the best and worst clips and one self-contained index.html that shows them all."""

from __future__ import annotations

import base64
import datetime
import html
import json
import re
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from rich.box import SIMPLE_HEAD
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lipsync_cli import media
from lipsync_cli.errors import require
from lipsync_cli.eval import protocols
from lipsync_cli.eval.metrics import NOT_COMPUTED
from lipsync_cli.files import json_safe

ARROW = {"low": "↓", "high": "↑", "one": "→1", "zero": "→0"}
PROTOCOL_NOTES = {
    "reconstruct/media": "first 60% of each shared clip is the reference (the only mouths the engine may use, and "
    "its audio map's training data); the last 40% is re-created from its own audio over its own frames and "
    "compared with them.",
    "reconstruct/grid": f"each held-out GRID clip is re-created from {protocols.GRID_REFS} other clips of the same "
    "speaker (the reference); its own frames are the background and the truth; its .align words give the transcript.",
    "cross": "each video driven by another file's speech (or TTS), no ground truth: reference-free metrics only.",
    "baselines": "real = the real footage with its own audio (ceiling); frozen = one closed-mouth reference frame on "
    f"every output frame; floor = the input video unchanged with the new audio (reconstruct: the held-out frames "
    f"played {protocols.FLOOR_SHIFT_S:g} s late, circularly, against the held-out speech).",
}


def _better(a: float, b: float, better: str) -> bool:
    """Is a better than b in this column's direction?"""
    if not np.isfinite(a):
        return False
    if not np.isfinite(b):
        return True
    key = {"low": lambda v: v, "high": lambda v: -v, "one": lambda v: abs(v - 1), "zero": abs}[better]
    return key(a) < key(b)


def _fmt(v: float, key: str = "") -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:.1f}" if key.startswith(("psnr", "sync_off")) else f"{v:.3f}"


def _best(means: dict[str, dict[str, float]], key: str, better: str, systems: list[str]) -> str | None:
    """The best system in a column, the real footage left out (it is the ceiling, not a contender)."""
    best = None
    for s in systems:
        if s != "real" and (best is None or _better(means[s][key], means[best][key], better)):
            best = s
    return best


def _table(run: protocols.EvalRun, group: str, cols: list, title: str) -> Table:
    means, systems = run.means(group), run.systems()
    t = Table(title=title, title_justify="left", box=SIMPLE_HEAD)
    t.add_column("system", no_wrap=True, min_width=max(len(s) for s in systems))
    for _key, _m, better, label in cols:
        t.add_column(f"{label} {ARROW[better]}", justify="right", no_wrap=True, min_width=len(label) + 2)
    best = {key: _best(means, key, better, systems) for key, _m, better, _l in cols}
    for s in systems:
        cells = []
        for key, *_ in cols:
            txt = _fmt(means[s][key], key)
            cells.append(f"[bold green]{txt}[/]" if best[key] == s and txt != "–" else txt)
        t.add_row(s if s != "real" else "[dim]real[/]", *cells)
    return t


def tables(run: protocols.EvalRun, width: int | None = None) -> list[Table]:
    """One table per protocol group: rows are systems, columns metrics with their direction; best in bold.
    A table too wide for `width` columns of text is cut into parts that fit, columns kept in order."""
    out = []
    for group in run.groups:
        n = sum(c.group == group for c in run.clips)
        title = f"{group}: {n} clip{'s' * (n != 1)}, mean over clips (gap: median)"
        parts: list[list] = [[]]
        for col in run.columns(group):
            trial = _table(run, group, [*parts[-1], col], title)
            if width is not None and parts[-1] and Console(width=1000).measure(trial).maximum > width:
                parts.append([])
            parts[-1].append(col)
        for i, cols in enumerate(parts):
            out.append(_table(run, group, cols, title + (f" ({i + 1}/{len(parts)})" if len(parts) > 1 else "")))
    return out


def print_report(run: protocols.EvalRun, console: Console | None = None) -> None:
    """The tables, then what was not computed and why (piped output gets room for the whole table)."""
    if console is None:
        console = Console()
        console = console if console.is_terminal else Console(width=200)
    for t in tables(run, console.width):
        console.print(t)
    if not run.clips:
        console.print("[yellow]no clip could be evaluated[/]")
    for name, why in NOT_COMPUTED.items():
        console.print(f"[dim]note: {name} not computed: {why}[/]")
    for group, clip, why in run.skipped:
        console.print(f"[yellow]skipped[/] {escape(f'{group} {clip}: {why}')}")


# ----------------------------------------------------------------------------- side-by-side videos


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")


class SideBySide:
    """on_clip hook: writes real | generated (with the speech) for every clip; write_report keeps best and worst."""

    def __init__(self, folder: Path, max_height: int = 360):
        self.folder, self.max_height = Path(folder), max_height
        self.staged: dict[tuple[str, str], Path] = {}

    def __call__(
        self, group: str, name: str, left: np.ndarray, right: np.ndarray, speech: np.ndarray, fps: float
    ) -> None:
        h, w = left.shape[1:3]
        s = min(1.0, self.max_height / h)
        size = (2 * round(w * s / 2), 2 * round(h * s / 2))
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{slug(group)}__{slug(name)}.mp4"
        with tempfile.TemporaryDirectory(prefix="lipsync-eval-") as tmp:
            wav = Path(tmp) / "speech.wav"
            media.write_wav(wav, speech, protocols.SR)
            with media.VideoWriter(path, 2 * size[0], size[1], fps=fps, audio=wav) as vw:
                for a, b in zip(left, right, strict=True):
                    pair = [cv2.resize(np.ascontiguousarray(x), size, interpolation=cv2.INTER_AREA) for x in (a, b)]
                    for img, label in zip(pair, ("real" if group.startswith("reconstruct") else "input", "generated"),
                                          strict=True):  # fmt: skip
                        cv2.putText(img, label, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
                    vw.write(np.concatenate(pair, axis=1))
        self.staged[(group, name)] = path


def pick_clips(run: protocols.EvalRun, group: str) -> tuple[str, str] | None:
    """(best, worst) clip of a group for the engine: by LVE where there is ground truth, else AV correlation."""
    clips = [c for c in run.clips if c.group == group]
    for key, better in (("lve", "low"), ("sync_r", "high"), ("closure", "high")):
        vals = [(c.scores.get(run.engine, {}).get(key, np.nan), c.name) for c in clips]
        vals = [(v, n) for v, n in vals if np.isfinite(v)]
        if vals:
            vals.sort(reverse=better == "high")
            return vals[0][1], vals[-1][1]
    return None


# ----------------------------------------------------------------------------- plots


def pyplot():
    require("matplotlib", "eval", "the eval report's plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


COLOURS = {"real": "black", "frozen": "tab:gray", "floor": "tab:red"}


def plot_opening(run: protocols.EvalRun, group: str, path: Path, n_clips: int = 3) -> Path | None:
    """Mouth opening over time (engine vs real, or vs the input in cross) with the speech envelope behind."""
    clips = [c for c in run.clips if c.group == group and run.engine in c.series][:n_clips]
    if not clips or "opening" not in clips[0].series[run.engine]:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(len(clips), 1, figsize=(10, 2.6 * len(clips)), squeeze=False)
    other = "real" if group.startswith("reconstruct") else "floor"
    for ax, c in zip(axes[:, 0], clips, strict=True):
        t = np.arange(len(c.envelope)) / run.fps
        env = ax.twinx()
        env.fill_between(t, -60, np.maximum(c.envelope, -60), color="tab:blue", alpha=0.12, lw=0)
        env.set_ylim(-60, 0)
        env.set_ylabel("speech dB", color="tab:blue", fontsize=8)
        for i in np.flatnonzero(c.must_close):
            ax.axvspan(t[i] - 0.5 / run.fps, t[i] + 0.5 / run.fps, color="tab:orange", alpha=0.15, lw=0)
        ax.plot(t, c.series[other]["opening"][: len(t)], color="black", lw=1.4,
                label="real" if other == "real" else "input video")  # fmt: skip
        ax.plot(t, c.series[run.engine]["opening"][: len(t)], color="tab:green", lw=1.6, label=run.engine)
        ax.set_zorder(env.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.set_title(f"{c.name}  (orange: mouth must close)", fontsize=9, loc="left")
        ax.set_ylabel("mouth opening / IOD", fontsize=8)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(f"{group}: mouth opening vs speech", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_sync(run: protocols.EvalRun, group: str, path: Path) -> Path | None:
    """Mean correlation of mouth opening and speech envelope per lag, per system."""
    clips = [c for c in run.clips if c.group == group]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    drawn = False
    for s in run.systems():
        curves = [c.series[s]["corr_by_lag"] for c in clips if "corr_by_lag" in c.series.get(s, {})]
        if not curves:
            continue
        lags = np.arange(len(curves[0])) - len(curves[0]) // 2
        ax.plot(lags, np.mean(curves, axis=0), lw=2 if s == run.engine else 1.3, color=COLOURS.get(s, "tab:green"),
                label=s)  # fmt: skip
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axvline(0, color="k", lw=0.6, ls=":")
    ax.set_xlabel("lag (frames; > 0: video lags the audio)")
    ax.set_ylabel("correlation")
    ax.set_title(f"{group}: mouth opening vs speech envelope", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_clips(run: protocols.EvalRun, group: str, path: Path) -> Path | None:
    """Per-clip bars of the headline metrics, one panel each, the four systems side by side."""
    keys = [c for c in run.columns(group) if c[0] in ("lve", "sync_r", "closure")]
    clips = [c for c in run.clips if c.group == group]
    if not keys or not clips:
        return None
    plt = pyplot()
    systems = run.systems()
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(7, 0.9 * len(clips) + 3), 2.4 * len(keys)), squeeze=False)
    x = np.arange(len(clips))
    w = 0.8 / len(systems)
    for ax, (key, _m, better, label) in zip(axes[:, 0], keys, strict=True):
        for j, s in enumerate(systems):
            v = [c.scores.get(s, {}).get(key, np.nan) for c in clips]
            ax.bar(x + (j - (len(systems) - 1) / 2) * w, v, w, label=s, color=COLOURS.get(s, "tab:green"))
        ax.set_ylabel(f"{label} {ARROW[better]}", fontsize=9)
        ax.set_xticks(x, [c.name[:24] for c in clips], rotation=25, ha="right", fontsize=7)
    axes[0, 0].legend(fontsize=8, ncol=len(systems), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.suptitle(f"{group}: per clip", fontsize=11, x=0.02, ha="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- files


def to_json(run: protocols.EvalRun) -> dict:
    """Everything measured: per clip and mean per group, with what each column means."""
    groups = {}
    for g in run.groups:
        clips = []
        for c in (c for c in run.clips if c.group == g):
            corr = {s: v["corr_by_lag"] for s, v in c.series.items() if "corr_by_lag" in v}
            clips.append({"name": c.name, "info": c.info, "scores": c.scores, "sync_corr_by_lag": corr})
        groups[g] = {"mean": run.means(g), "clips": clips}
    return json_safe(
        {
            "engine": run.engine,
            "metrics": run.metrics,
            "fps": run.fps,
            "columns": {k: {"metric": m, "better": b, "label": lab} for k, m, b, lab in protocols.COLUMNS},
            "protocols": PROTOCOL_NOTES,
            "not_computed": NOT_COMPUTED,
            "groups": groups,
            "skipped": [{"group": g, "clip": c, "why": w} for g, c, w in run.skipped],
        }
    )


def _html_table(run: protocols.EvalRun, group: str) -> str:
    cols, means, systems = run.columns(group), run.means(group), run.systems()
    head = "".join(f"<th>{html.escape(lab)} {ARROW[b]}</th>" for _k, _m, b, lab in cols)
    rows = []
    for s in systems:
        cells = []
        for key, _m, better, _l in cols:
            txt = _fmt(means[s][key], key)
            bold = _best(means, key, better, systems) == s and txt != "–"
            cells.append(f"<td>{'<b>' + txt + '</b>' if bold else txt}</td>")
        rows.append(f"<tr class='{'real' if s == 'real' else ''}'><th>{html.escape(s)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th>system</th>{head}</tr>{''.join(rows)}</table>"


def _html_clips(run: protocols.EvalRun, group: str) -> str:
    cols = run.columns(group)
    head = "".join(f"<th>{html.escape(lab)}</th>" for _k, _m, _b, lab in cols)
    rows = []
    for c in (c for c in run.clips if c.group == group):
        for s in run.systems():
            cells = "".join(f"<td>{_fmt(c.scores.get(s, {}).get(k, np.nan), k)}</td>" for k, *_ in cols)
            rows.append(f"<tr><td>{html.escape(c.name)}</td><td>{html.escape(s)}</td>{cells}</tr>")
    return f"<details><summary>per clip</summary><table><tr><th>clip</th><th>system</th>{head}</tr>" + (
        "".join(rows) + "</table></details>"
    )


def img_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f"<img src='data:image/png;base64,{data}' alt='{html.escape(path.name)}'>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.6em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}th:first-child,td:first-child{text-align:left}tr.real{color:#777}img{max-width:100%;margin:.4em 0}
video{max-width:100%}.note{color:#666;font-size:13px}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""


def write_report(run: protocols.EvalRun, out_dir: Path, videos: SideBySide | None = None) -> Path:
    """metrics.json, the PNG plots, best/worst side-by-side videos and index.html in out_dir; returns index.html."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(to_json(run), indent=1))
    kept: dict[str, list[tuple[str, str]]] = {}
    if videos is not None:
        vid_dir = out_dir / "videos"
        vid_dir.mkdir(exist_ok=True)
        keep = set()
        for g in run.groups:
            pick = pick_clips(run, g)
            if pick is None:
                continue
            for label, name in zip(("best", "worst"), pick, strict=True):
                src = videos.staged.get((g, name))
                if src is None or (label == "worst" and pick[0] == pick[1]):
                    continue
                dst = vid_dir / src.name
                if src.resolve() != dst.resolve():
                    shutil.copyfile(src, dst)
                keep.add(dst.resolve())
                kept.setdefault(g, []).append((label, dst.relative_to(out_dir).as_posix()))
        for path in videos.staged.values():  # the clips that are neither best nor worst
            if path.resolve() not in keep and path.exists():
                path.unlink()

    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>lipsync eval: {html.escape(run.engine)}</title>",
        f"<style>{CSS}</style></head><body><h1>lipsync eval: {html.escape(run.engine)}</h1>",
        f"<p class='note'>{datetime.datetime.now():%Y-%m-%d %H:%M} · metrics: {', '.join(run.metrics)} · "
        f"<a href='metrics.json'>metrics.json</a></p>",
        f"<p class='note'>{html.escape(PROTOCOL_NOTES['baselines'])} Bold: best of engine and baselines (real is "
        "the ceiling). →1 / →0: closest to 1 / 0 is best. Means over clips, except gap (median).</p>",
    ]
    for g in run.groups:
        name = slug(g)
        parts.append(f"<h2>{html.escape(g)}</h2><p class='note'>{html.escape(PROTOCOL_NOTES.get(g, ''))}</p>")
        parts.append(_html_table(run, g))
        parts.append(_html_clips(run, g))
        for fn in (plot_opening, plot_sync, plot_clips):
            png = fn(run, g, out_dir / f"{fn.__name__.removeprefix('plot_')}_{name}.png")
            if png is not None:
                parts.append(img_tag(png))
        for label, rel in kept.get(g, []):
            parts.append(f"<h3>{label} clip: real | generated</h3><video controls src='{html.escape(rel)}'></video>")
    parts.append("<h2>notes</h2><ul>")
    parts += [f"<li>{html.escape(k)} not computed: {html.escape(v)}</li>" for k, v in NOT_COMPUTED.items()]
    parts += [f"<li>skipped {html.escape(g)} {html.escape(c)}: {html.escape(w)}</li>" for g, c, w in run.skipped]
    parts.append("</ul></body></html>")
    index = out_dir / "index.html"
    index.write_text("\n".join(parts), encoding="utf-8")
    return index
