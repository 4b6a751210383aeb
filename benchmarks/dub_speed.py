"""The dub's wall time against the codec floor, measured in the same run, per stage and end to end.

    python benchmarks/dub_speed.py [--clip FILE] [--text TEXT | --speech FILE] [--voice clone|tts]
    python benchmarks/dub_speed.py --long [--minutes 1 5 10] [--long-speech FILE] [--speech-minutes 1 5 10]

Short run: one dub of `--clip` (default the 512x512 shared clip of issue 13) from `--text` (TTS + voice clone: the
whole user path), as a fresh process (start-up and imports counted). The floor: ffmpeg alone decoding the same
input frames (looped to the output's length) and encoding them with the dub's settings (libx264 veryfast crf 18,
media.X264_OPTIONS, yuv420p). Stage rows are each stage's time / the floor's: the stages overlap (the voice runs
beside the face pass), so they do not add up to the total.

Long run: a long 1080p input made by looping a shared clip (stream copy, so no re-encode), dubbed from a 60 s speech
file (or from that file looped to each of `--speech-minutes`); peak RSS (the dub's whole process tree, sampled
every 0.25 s) and peak temp-disk use (TMPDIR, in brackets, plus the temp files beside the output: the output
itself while it is written, and the silent video before the voice is muxed in), for each input length in
`--minutes`. The machine's load average is printed beside every figure: on a
shared CPU the absolute times are pessimistic, the ratio to the floor measured in the same run less so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEXT = (
    "Thank you all for coming tonight. I have been waiting a long time to say this, and I am very happy to finally "
    "be here with you. We built this together, one small step at a time, and every one of you made it better. "
    "Tomorrow we start the next chapter, and I cannot wait to see what we make of it. Please enjoy the evening, "
    "and thank you again."
)
DUB = """
import json, sys, time
t0 = time.perf_counter()
from pathlib import Path
from lipsync_cli import progress
from lipsync_cli.dubbing import dub
from lipsync_cli.settings import Settings
progress.set_quiet(True)
a = json.loads(sys.argv[1])
s = Settings(quiet=True).with_overrides(voice=a["voice"], sync_mode=a["mode"])
t1 = time.perf_counter()
r = dub(Path(a["video"]), a["text"], Path(a["audio"]) if a["audio"] else None, Path(a["out"]), s, force=True)
r.timings["imports"] = t1 - t0
import lipsync_cli
print(json.dumps({"timings": r.timings, "frames": r.frames, "duration": r.duration, "code": lipsync_cli.__file__}))
"""


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc), less the children that have not exec'd yet: between fork (or
    vfork) and exec a child shares its parent's pages, and its VmRSS would count them a second time (a 0.4 s
    spike of +1 GB was seen when the render started an ffmpeg)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += [k for k in kids.get(p, []) if not _same_image(k, p)]
    return out


def _same_image(child: int, parent: int) -> bool:
    """A child still running its parent's program image (forked, not yet exec'd)."""
    try:
        return Path(f"/proc/{child}/cmdline").read_bytes() == Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return True


def rss(pids: list[int]) -> int:
    total = 0
    for p in pids:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def disk(folders: list[Path], tag: str = "lipsync-") -> int:
    total = 0
    for f in folders:
        for p in f.rglob("*"):
            try:
                if p.is_file() and (f.name.startswith("bench-tmp") or tag in p.name):
                    total += p.stat().st_size
            except OSError:
                pass
    return total


def run_dub(
    video: Path, text: str | None, audio: Path | None, out: Path, voice: str, mode: str = "bounce", src: Path = ROOT
) -> dict:
    """One dub in a fresh interpreter (code from `src`); wall time, stage timings, peak RSS of its process tree and
    peak temp disk."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-tmp"))
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(src))
    arg = dict(video=str(video), text=text, audio=str(audio) if audio else None, out=str(out), voice=voice, mode=mode)
    peak = {"rss": 0, "disk": 0, "tmpdir": 0}
    trace: list[tuple[float, int, int, int]] = []  # (s since start, RSS, temp disk, of which TMPDIR) every sample
    t = time.perf_counter()
    # cwd=src: `python -c` puts the working folder first on sys.path, ahead of PYTHONPATH (before, a --compare run
    # imported this tree's code, not src's)
    cmd = [sys.executable, "-c", DUB, json.dumps(arg)]
    proc = subprocess.Popen(cmd, env=env, cwd=src, stdout=subprocess.PIPE, text=True)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            tmp_now, beside = disk([tmp]), disk([out.parent])
            trace.append((time.perf_counter() - t, rss(tree(proc.pid)), tmp_now + beside, tmp_now))
            peak["rss"] = max(peak["rss"], trace[-1][1])
            peak["disk"] = max(peak["disk"], trace[-1][2])
            peak["tmpdir"] = max(peak["tmpdir"], tmp_now)
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, usage = os.wait4(proc.pid, 0)  # CPU of the dub and every process it waited for (ffmpeg, voice)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    stdout = proc.stdout.read()
    stop.set()
    th.join()
    left = [p.name for p in tmp.rglob("*") if "lipsync-" in p.name]
    shutil.rmtree(tmp)
    if left and src == ROOT:
        raise SystemExit(f"the dub left temp files behind: {left}")
    if proc.returncode != 0:
        raise SystemExit(f"dub failed ({proc.returncode})")
    res = json.loads(stdout.strip().splitlines()[-1])
    if not Path(res["code"]).resolve().is_relative_to(Path(src).resolve()):
        raise SystemExit(f"the dub ran {res['code']}, not the code in {src}")
    res.update(
        wall=wall,
        cpu=usage.ru_utime + usage.ru_stime,
        peak_rss=peak["rss"],
        peak_disk=peak["disk"],
        peak_tmpdir=peak["tmpdir"],
        output_bytes=out.stat().st_size,
        load=load(),
        trace=trace,
    )
    return res


def codec_floor(video: Path, frames: int, out: Path, crf: int = 18) -> float:
    """ffmpeg alone: decode `frames` frames of `video` (looped) and encode them as the dub does."""
    from lipsync_cli import media

    cmd = [media.ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(video)]
    cmd += ["-frames:v", str(frames), "-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", str(crf)]
    cmd += [a for k, v in media.X264_OPTIONS.items() for a in (f"-{k}", v)]
    cmd += ["-pix_fmt", "yuv420p", str(out)]
    t = time.perf_counter()
    p = subprocess.Popen(cmd)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit("ffmpeg failed")
    return time.perf_counter() - t, usage.ru_utime + usage.ru_stime


def short_run(args: argparse.Namespace, work: Path) -> None:
    from lipsync_cli import media

    info = media.probe(args.clip)
    text = None if args.speech else args.text
    res = run_dub(args.clip, text, args.speech, work / "out.mp4", args.voice)
    floor, floor_cpu = codec_floor(args.clip, res["frames"], work / "floor.mp4")
    base = (
        run_dub(args.clip, text, args.speech, work / "base.mp4", args.voice, src=args.compare) if args.compare else None
    )
    n = res["frames"]
    print(f"\n## {args.clip.name} {info.width}x{info.height}, {n} output frames ({res['duration']:.1f} s), "
          f"{'text, voice ' + args.voice if text else 'audio file'}; load average {res['load']}")  # fmt: skip
    head = "| stage | seconds | x codec floor |" + (f" {args.compare} s | x floor |" if base else "")
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    print(f"| codec floor (ffmpeg decode+encode) | {floor:.1f} | 1.00 |" + (f" {floor:.1f} | 1.00 |" if base else ""))
    for k in dict.fromkeys([*res["timings"], *(base["timings"] if base else [])]):
        if k == "total":
            continue
        row = f"| {k} | " + (
            f"{res['timings'][k]:.1f} | {res['timings'][k] / floor:.2f} |" if k in res["timings"] else " | |"
        )
        if base:
            b = base["timings"].get(k)
            row += f" {b:.1f} | {b / floor:.2f} |" if b is not None else " | |"
        print(row)
    row = f"| **end to end (process start counted)** | {res['wall']:.1f} | **{res['wall'] / floor:.2f}** |"
    print(row + (f" {base['wall']:.1f} | **{base['wall'] / floor:.2f}** |" if base else ""))
    cpu = f"CPU seconds: dub {res['cpu']:.0f}, floor {floor_cpu:.0f} (x{res['cpu'] / floor_cpu:.2f})"
    if base:
        cpu += f", {args.compare} {base['cpu']:.0f} (x{base['cpu'] / floor_cpu:.2f})"
    print(cpu)
    print(f"dub {n / res['wall']:.0f} fps, floor {n / floor:.0f} fps; peak RSS {res['peak_rss'] / 1e9:.2f} GB, "
          f"peak temp disk {res['peak_disk'] / 1e6:.0f} MB")  # fmt: skip
    if base:
        print(f"{args.compare}: {base['frames']} frames, peak RSS {base['peak_rss'] / 1e9:.2f} GB, "
              f"peak temp disk {base['peak_disk'] / 1e6:.0f} MB, load average {base['load']}")  # fmt: skip


def long_input(src: Path, minutes: float, work: Path) -> Path:
    from lipsync_cli import media

    out = work / f"long_{minutes:g}min.mp4"
    if not out.exists():
        n = max(1, int(round(minutes * 60 / media.probe(src).duration)))
        cmd = [media.ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-stream_loop", str(n - 1), "-i", str(src)]
        subprocess.run([*cmd, "-c", "copy", str(out)], check=True)
    return out


def long_speech(src: Path, minutes: float, work: Path) -> Path:
    """A speech file of `minutes` made by looping `src` (16-bit PCM wav at its own rate)."""
    from lipsync_cli import media

    out = work / f"speech_{minutes:g}min.wav"
    if not out.exists():
        cmd = [media.ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-y", "-stream_loop", "-1", "-i", str(src)]
        subprocess.run([*cmd, "-t", f"{minutes * 60:g}", "-c:a", "pcm_s16le", str(out)], check=True)
    return out


def long_run(args: argparse.Namespace, work: Path) -> None:
    from lipsync_cli import media

    speeches = [long_speech(args.long_speech, m, work) for m in args.speech_minutes] or [args.long_speech]
    print(f"\n## long inputs: {args.long_clip.name} looped, dubbed from {args.long_speech.name}"
          f"{' looped' if args.speech_minutes else ''} ({args.mode})")  # fmt: skip
    print("| input | speech | output frames | dub s | floor s | x floor | CPU x floor | peak RSS GB | peak temp MB "
          "(TMPDIR) | output MB | load avg |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for m in args.minutes:
        video = long_input(args.long_clip, m, work)
        info = media.probe(video)
        for speech in speeches:
            res = run_dub(video, None, speech, work / "long_out.mp4", "tts", args.mode)
            print(f"dub of {video.name} from {speech.name}: {res['wall']:.0f} s, peak RSS {res['peak_rss'] / 1e9:.2f} "
                  f"GB, load {res['load']}", file=sys.stderr, flush=True)  # fmt: skip
            if args.trace:  # RSS over the run: what stays flat and what grows
                args.trace.mkdir(parents=True, exist_ok=True)
                name = f"{video.stem}_{speech.stem}.json"
                (args.trace / name).write_text(json.dumps({"timings": res["timings"], "trace": res["trace"]}))
            floor, floor_cpu = codec_floor(video, res["frames"], work / "floor.mp4") if args.floor else (0.0, 0.0)
            ratio = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
            print(f"| {m:g} min {info.width}x{info.height} | {len(media.read_audio(speech)) / 16000:.0f} s | "
                  f"{res['frames']} | {res['wall']:.0f} | {floor:.0f} | {ratio(res['wall'], floor)} | "
                  f"{ratio(res['cpu'], floor_cpu)} | {res['peak_rss'] / 1e9:.2f} | {res['peak_disk'] / 1e6:.0f} "
                  f"({res['peak_tmpdir'] / 1e6:.0f}) | {res['output_bytes'] / 1e6:.0f} | {res['load']} |",
                  flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clip", type=Path, default=SHARED / "media" / "sadtalker_WDA_KatieHill_000.mp4")
    ap.add_argument("--text", default=TEXT)
    ap.add_argument("--speech", type=Path, help="dub from this audio file instead of --text")
    ap.add_argument("--voice", default="clone", choices=["clone", "tts"])
    ap.add_argument("--compare", type=Path, help="also run the dub from this source tree (e.g. ../main), same run")
    ap.add_argument("--long", action="store_true", help="also the long-input runs")
    ap.add_argument("--long-only", action="store_true")
    ap.add_argument("--long-clip", type=Path, default=SHARED / "media" / "latentsync_demo2_video.mp4")
    ap.add_argument("--long-speech", type=Path, default=SHARED / "speech" / "musetalk_eng.wav")
    ap.add_argument("--minutes", type=float, nargs="*", default=[1, 5, 10], help="long input lengths")
    ap.add_argument(
        "--speech-minutes",
        type=float,
        nargs="*",
        default=[],
        help="dub each long input from --long-speech looped to these lengths (default: as it is)",
    )
    ap.add_argument("--trace", type=Path, help="long runs: write each dub's RSS and temp disk over time here")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="long runs: skip the codec floor")
    ap.add_argument("--mode", default="bounce", choices=["bounce", "loop", "cut"])
    ap.add_argument("--work", type=Path, help="keep the made inputs here (default: a temp folder)")
    args = ap.parse_args()
    if not args.clip.exists():
        raise SystemExit(f"shared media absent: {args.clip}")
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not args.long_only:
            short_run(args, work)
        if args.long or args.long_only:
            long_run(args, work)


if __name__ == "__main__":
    main()
