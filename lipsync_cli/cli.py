"""The `lipsync` command: one thin function per subcommand over importable functions. No logic lives here."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape

from lipsync_cli import __version__, progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import (
    Engine,
    Hear,
    Precision,
    PrepSize,
    Settings,
    SyncMode,
    Tts,
    Voice,
    config_path,
    default,
    load_settings,
    plain,
)

app = typer.Typer(
    help="Lip-sync dubbing for the GPU-poor: make the person in a video say new words, offline, on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)
config_app = typer.Typer(help="Show the settings in force.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Fetch, import and list audio-visual corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _d(help: str, setting: str) -> str:
    """Help text ending in the setting's default (the option itself defaults to 'not given': settings decide)."""
    return f"{help} \\[default: {plain(default(setting))}]"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str))


def _version(value: bool) -> None:
    if value:
        print(f"lipsync {__version__}")
        raise typer.Exit()


def _settings(ctx: typer.Context, **flags) -> Settings:
    """The shared settings object with this command's flags applied on top (flags win)."""
    base: Settings = ctx.obj
    s = base.with_overrides(**flags)
    progress.set_quiet(s.quiet)
    return s


@app.callback()
def _root(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option(help="Config file (default: ./lipsync.toml).")] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", metavar="", help="No progress bars (also after the subcommand).")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.meta["config_file"] = config if config is not None else config_path()
    settings = load_settings(config)
    ctx.obj = settings.with_overrides(quiet=True) if quiet else settings
    progress.set_quiet(ctx.obj.quiet)


VOICE_HELP = "clone: the person's own voice, learned from the video's speech (default) | tts: the plain TTS voice."
VOICE_REF_HELP = "Learn the voice from this recording of the person instead of the video's soundtrack."
JSON_HELP = "Print the result as JSON on stdout."
FALLBACK_HELP = "No usable speech to learn the voice from: speak in the plain TTS voice (warning) instead of stopping."
MODEL_DIR_HELP = "--tts xtts: folder with the XTTS v2 files (config.json, model.pth, vocab.json); never downloaded."
ADAPT_HELP = _d("--engine neural: minutes of fine-tuning the renderer on this face first (0: none).", "adapt_minutes")
TTS_HELP = _d("Text-to-speech backend.", "tts")
MEASURE_HELP = (
    "Re-track the output and report whether it says the words: p/b/m closed, vowel contrast, rest in pauses "
    "(with --audio: needs --transcript)."
)
BATCH_HELP = (
    "Dub every job in this .jsonl (or .csv) file, models loaded once: one result line each, failed jobs reported "
    "and skipped. Fields: video, text or audio, output (optional), any setting (engine, voice, ...). Relative paths "
    "are relative to the file."
)


def _voice_settings(
    s: Settings,
    tts: Tts | None,
    voice: Voice | None,
    voice_ref: Path | None,
    voice_fallback: bool | None,
    tts_model_dir: Path | None,
) -> Settings:
    """The voice flags on top of the settings: --voice-ref implies --voice clone (and contradicts --voice tts)."""
    if voice_ref is not None and voice == "tts":
        raise LipsyncError("--voice-ref gives a voice to clone: it cannot go with --voice tts")
    voice = voice or ("clone" if voice_ref is not None else None)
    return s.with_overrides(
        tts=tts, voice=voice, voice_ref=voice_ref, voice_fallback=voice_fallback, tts_model_dir=tts_model_dir
    )


@app.command()
def dub(
    ctx: typer.Context,
    video: Annotated[Path | None, typer.Argument(help="The video of the person talking.")] = None,
    text: Annotated[str | None, typer.Argument(help="The new words (or use --audio).")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", "-a", help="Drive the mouth with this audio file.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help=".mp4, .m4v, .mov or .mkv. Default: <video>.dubbed.mp4")
    ] = None,
    force: Annotated[bool, typer.Option("--force", "-f", metavar="", help="Overwrite an existing output.")] = False,
    sync_mode: Annotated[SyncMode | None, typer.Option(help=_d("Speech longer than the video.", "sync_mode"))] = None,
    face: Annotated[
        int | None, typer.Option("--face", help=_d("Which face: 0 = largest, 1 = next.", "face_index"))
    ] = None,
    engine: Annotated[Engine | None, typer.Option(help=_d("Mouth engine.", "engine"))] = None,
    adapt_minutes: Annotated[float | None, typer.Option(help=ADAPT_HELP)] = None,
    tts: Annotated[Tts | None, typer.Option(help=TTS_HELP)] = None,
    voice: Annotated[Voice | None, typer.Option(help=_d(VOICE_HELP, "voice"))] = None,
    voice_ref: Annotated[Path | None, typer.Option(help=VOICE_REF_HELP)] = None,
    voice_fallback: Annotated[bool | None, typer.Option("--voice-fallback", metavar="", help=FALLBACK_HELP)] = None,
    tts_model_dir: Annotated[Path | None, typer.Option(help=MODEL_DIR_HELP)] = None,
    crf: Annotated[int | None, typer.Option(help=_d("x264 quality, lower is better.", "crf"))] = None,
    transcript: Annotated[
        str | None,
        typer.Option(help="The words spoken in --audio (text, or a text file): p/b/m and vowels timed exactly."),
    ] = None,
    hear: Annotated[
        Hear | None,
        typer.Option(help=_d("--audio without --transcript: recognise words (English) or phones (any).", "hear")),
    ] = None,
    measure: Annotated[bool, typer.Option("--measure", metavar="", help=MEASURE_HELP)] = False,
    batch: Annotated[Path | None, typer.Option("--batch", help=BATCH_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help=JSON_HELP)] = False,
) -> None:
    """Make the person in VIDEO say TEXT (or the speech in --audio), in their own voice."""
    s = _settings(
        ctx, sync_mode=sync_mode, face_index=face, engine=engine, crf=crf, adapt_minutes=adapt_minutes, hear=hear
    )
    s = _voice_settings(s, tts, voice, voice_ref, voice_fallback, tts_model_dir)
    if batch is not None:
        if video is not None or text is not None or audio is not None or output is not None:
            raise typer.BadParameter("the jobs file gives the videos and words: no VIDEO, TEXT, --audio or -o with it")
        from lipsync_cli.batch import run_batch

        if code := run_batch(batch, s, force=force, as_json=as_json):
            raise typer.Exit(code)
        return
    if video is None:
        raise typer.BadParameter("give a VIDEO (or --batch FILE)", param_hint="VIDEO")
    if measure and audio is not None and transcript is None:
        raise typer.BadParameter("--measure with --audio needs --transcript (the words to look for)")
    from lipsync_cli.dubbing import dub as run_dub
    from lipsync_cli.dubbing import read_transcript

    result = run_dub(video, text, audio, output, s, force=force, transcript=transcript)
    if measure:
        from lipsync_cli.api import measure_articulation

        measure_articulation(result, text if audio is None else read_transcript(transcript))
    if as_json:
        _print_json(result.to_json())
        return
    progress.log(
        f"[green]wrote[/] {escape(str(result.output))}  ({result.frames} frames, {result.duration:.2f} s, "
        f"face in {result.faces_found:.0%} of input frames, {result.timings['total']:.1f} s)"
    )
    if result.heard is not None:
        shown = result.heard if len(result.heard) <= 200 else result.heard[:200] + " ..."
        progress.log(f'heard "{escape(shown)}" (the mouth follows these words; --transcript gives the right ones)')
    if a := result.articulation:
        progress.log(f"re-tracked output: {_articulation_line(a)} (targets: >= 90%, >= 3.5, >= 90%)")


def _articulation_line(a: dict) -> str:
    """`--measure`'s three figures in words; one the words give nothing to measure (no p/b/m, no open vowel, no
    pause) says so instead of printing nan."""

    def shown(value: float, text: str, none: str) -> str:
        return text.format(value) if math.isfinite(value) else none

    return ", ".join(
        (
            shown(a["bilabial"], f"p/b/m closed {{:.0%}} of {a['n_bilabial']:.0f}", "no p/b/m in the words"),
            shown(a["contrast"], "open-vowel/closure contrast {:.2f}", "no open-vowel/closure contrast to measure"),
            shown(a["silence"], "at rest in pauses {:.0%}", "no pause to rest in"),
        )
    )


@app.command("voice")
def voice_(
    ctx: typer.Context,
    video: Annotated[Path, typer.Argument(help="The video (or any recording) of the person talking.")],
    text: Annotated[str, typer.Argument(help="The new words.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: <video>.voice.wav")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", metavar="", help="Overwrite an existing output.")] = False,
    tts: Annotated[Tts | None, typer.Option(help=TTS_HELP)] = None,
    voice: Annotated[Voice | None, typer.Option(help=_d(VOICE_HELP, "voice"))] = None,
    voice_ref: Annotated[Path | None, typer.Option(help=VOICE_REF_HELP)] = None,
    voice_fallback: Annotated[bool | None, typer.Option("--voice-fallback", metavar="", help=FALLBACK_HELP)] = None,
    tts_model_dir: Annotated[Path | None, typer.Option(help=MODEL_DIR_HELP)] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help=JSON_HELP)] = False,
) -> None:
    """The speech `dub` would give VIDEO for TEXT, alone, as a wav: to listen to, or to reuse with --audio."""
    from lipsync_cli.voice.convert import keep_heap
    from lipsync_cli.voice.speech import speak

    keep_heap()  # this command's process converts the voice itself, as dub's voice process does
    s = _voice_settings(_settings(ctx), tts, voice, voice_ref, voice_fallback, tts_model_dir)
    result = speak(video, text, output, s, force=force)
    if as_json:
        _print_json(result.to_json())
        return
    shown = escape(str(result.output))
    progress.log(f"[green]wrote[/] {shown}  ({result.samples / 16000:.2f} s, voice: {result.voice})")


@data_app.command("fetch")
def data_fetch(
    ctx: typer.Context,
    speakers: Annotated[str, typer.Option(help="'5' = s1..s5, '1,3,7', '2-4' or 'all'.")] = "1",
    source: Annotated[
        Literal["zenodo", "sheffield"] | None, typer.Option(help=_d("Where to download from.", "grid_source"))
    ] = None,
    audio: Annotated[bool, typer.Option("--audio", metavar="", help="Also the 25 kHz wav files.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="Print URLs and sizes; download nothing.")
    ] = False,
    keep_archives: Annotated[bool, typer.Option("--keep-archives", metavar="", help="Keep the zip/tar files.")] = False,
    workers: Annotated[int | None, typer.Option(help="Parallel downloads.")] = None,
) -> None:
    """Download GRID speakers into <data_dir>/raw/grid/sN/{video,align,audio}/ (resumable, verified)."""
    from lipsync_cli.data.grid import fetch_grid

    s = _settings(ctx, grid_source=source, download_workers=workers)
    summary = fetch_grid(
        speakers,
        s.data_dir / "raw" / "grid",
        s.grid_source,
        base_url=s.grid_zenodo_url if s.grid_source == "zenodo" else s.grid_sheffield_url,
        api_url=s.grid_zenodo_api_url or None,
        audio=audio,
        workers=s.download_workers,
        retries=s.download_retries,
        timeout=s.download_timeout,
        keep_archives=keep_archives,
        dry_run=dry_run,
        quiet=s.quiet,
    )
    if not dry_run:
        progress.log(
            f"[green]GRID ready[/]: {len(summary.fetched)} speaker(s) fetched, {len(summary.skipped)} already there"
        )


@data_app.command("list")
def data_list(ctx: typer.Context) -> None:
    """Corpora on disk: speakers, clips, hours, size."""
    from rich.console import Console

    from lipsync_cli.data.corpus import corpus_summary, corpus_table

    s = _settings(ctx)
    notes: list[str] = []
    rows = corpus_summary(s.data_dir / "raw", notes)
    for note in dict.fromkeys(notes):  # a corpus's meta.json is read once per speaker: say it once
        progress.log(f"[yellow]note[/]: {escape(note)}")
    if not rows:
        progress.console.print(
            f"no corpora in {escape(str(s.data_dir / 'raw'))}: fetch GRID with `lipsync data fetch --speakers 1`, "
            "or cut your own videos into one with `lipsync data import PATH --name NAME`",
            highlight=False,
        )
        return
    Console().print(corpus_table(rows))


@data_app.command("import")
def data_import(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A video file, or a folder of them (searched recursively).")],
    name: Annotated[str, typer.Option("--name", help="Corpus name: data/raw/<name>/.")],
    speaker: Annotated[str | None, typer.Option(help="Speaker folder (default: the corpus name).")] = None,
) -> None:
    """Cut talking-head videos into utterance segments with one tracked face: a corpus in GRID's layout."""
    from rich.console import Console

    from lipsync_cli.data.importer import import_videos, summary_table

    s = _settings(ctx)
    summary = import_videos(path, s.data_dir / "raw", name, speaker, crf=s.crf, ffmpeg=s.ffmpeg)
    Console().print(summary_table(summary))
    if summary.all_failed:
        n = len(summary.failed)
        why = "the source could not be read" if n == 1 else f"none of the {n} sources could be read"
        raise LipsyncError(f"nothing imported: {why} (see the table above)")


@app.command("prep")
def prep_(
    ctx: typer.Context,
    workers: Annotated[int | None, typer.Option(help="Parallel processes (default: settings.prep_workers).")] = None,
    size: Annotated[PrepSize | None, typer.Option(help=_d("Aligned crop side in pixels.", "prep_size"))] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first K clips (in corpus/speaker/id order).")] = None,
    source: Annotated[
        list[Path] | None, typer.Option(help="Extra corpus root <root>/<speaker>/video/ (repeatable).")
    ] = None,
) -> None:
    """Every clip on disk -> training-ready shards in <data_dir>/prep/<size>/ with a manifest (resumable)."""
    from rich.console import Console

    from lipsync_cli.data.prep import prep, summary_table

    s = _settings(ctx, prep_workers=workers, prep_size=size)
    summary = prep(
        s.data_dir / "raw",
        s.data_dir / "prep" / str(s.prep_size),
        source or [],
        size=s.prep_size,
        workers=s.prep_workers,
        limit=limit,
        smooth=s.smooth,
        ffmpeg=s.ffmpeg,
    )
    Console().print(summary_table(summary))


@app.command("eval")
def eval_(
    ctx: typer.Context,
    metric: Annotated[
        str,
        typer.Option(
            help="lve, sync, closure, psnr, ssim, sharpness, stability: one, a comma list or all (the video "
            "metrics); voice: speaker similarity and WER of the cloned voice (alone or in the list); articulation: "
            "dubs from fixed sentences, re-tracked (the text protocol)."
        ),
    ] = "all",
    protocol: Annotated[
        Literal["reconstruct", "cross", "all", "text"],
        typer.Option(help="reconstruct (ground truth) | cross (new speech) | all | text (= --metric articulation)."),
    ] = "all",
    engine: Annotated[Engine | None, typer.Option(help=_d("Mouth engine to measure.", "engine"))] = None,
    adapt_minutes: Annotated[float | None, typer.Option(help=ADAPT_HELP)] = None,
    videos: Annotated[Path | None, typer.Option(help="Video folder (or file). Default: <shared>/media.")] = None,
    speech: Annotated[Path | None, typer.Option(help="cross: speech folder or file. Default: <shared>/speech.")] = None,
    text: Annotated[str | None, typer.Option(help="cross: drive every video with TTS of this text instead.")] = None,
    grid: Annotated[Path | None, typer.Option(help="GRID speaker folder (video/, align/). Default: found.")] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            min=0, help="Clips per protocol and corpus at most (0: all; default 8; voice, articulation: all)."
        ),
    ] = None,
    report: Annotated[Path | None, typer.Option(help="Write metrics.json, plots, videos and index.html here.")] = None,
    rows: Annotated[
        str | None,
        typer.Option(
            help="articulation: rows, e.g. 'lips model,map,neural,real' or ENGINE:KEY=VALUE;... (default: "
            "lips model,map,phone targets,real)."
        ),
    ] = None,  # fmt: skip
    as_json: Annotated[
        bool, typer.Option("--json", metavar="", help="Print the metrics as JSON on stdout (no tables).")
    ] = False,
) -> None:
    """Measure an engine against real footage and three baselines (real, frozen mouth, unchanged video)."""
    from lipsync_cli.eval import protocols
    from lipsync_cli.eval import report as rep

    s = _settings(ctx, engine=engine, adapt_minutes=adapt_minutes)
    if report is not None:
        _check_report(report)
    names = [n.strip().lower() for n in metric.split(",") if n.strip()]
    if protocol.strip().lower() == "text" and "articulation" not in names:
        names = ["articulation"]
    found: dict[str, Any] = {}
    if "articulation" in names:  # the text protocol: its own dubs, rows and table
        from lipsync_cli.eval import text_protocol as tp
        from lipsync_cli.eval import text_report as trep

        trun = tp.evaluate_text(s, videos, tp.parse_rows(rows), limit=limit or None,
                                keep=report / "videos" if report is not None else None)  # fmt: skip
        if as_json:
            found["articulation"] = trep.to_json(trun)
        else:
            trep.print_text_report(trun)
        if report is not None:
            progress.log(f"[green]wrote[/] {escape(str(trep.write_text_report(trun, report)))}")
        names = [n for n in names if n != "articulation"]
        if not names:
            if as_json:
                _print_json(found)
            return
        metric = ",".join(names)
    video_metrics = [n for n in names if n != "voice"]
    metrics = protocols.parse_metrics(",".join(video_metrics) or metric) if video_metrics or not names else []
    chosen = protocols.parse_protocols(protocol)
    if "voice" in names:  # measured on speech alone, not on video clips
        from lipsync_cli.eval import voice as ev

        vrun = ev.evaluate_voice(s, videos, grid, limit or None, texts=[text] if text else None)
        if as_json:
            found["voice"] = ev.to_json(vrun)
        else:
            ev.print_voice_report(vrun)
        if report is not None:
            progress.log(f"[green]wrote[/] {escape(str(ev.write_voice_report(vrun, report)))}")
        if not metrics:
            if as_json:
                _print_json(found)
            return
    hook = rep.SideBySide(report / "videos") if report is not None else None
    clips = 8 if limit is None else limit or None
    run = protocols.evaluate(
        s, metrics, chosen, videos=videos, speech=speech, text=text, grid=grid, limit=clips, on_clip=hook
    )
    if as_json:
        found["video"] = rep.to_json(run)
    else:
        rep.print_report(run)
    if report is not None:
        progress.log(f"[green]wrote[/] {escape(str(rep.write_report(run, report, hook)))}")
    if as_json:
        _print_json(found)
    if not run.clips:  # video metrics asked for and no clip measured: a failure, not an empty success
        reasons = "; ".join(f"{group} {clip}: {why}" for group, clip, why in run.skipped[:3])
        raise LipsyncError(f"no clip could be evaluated ({reasons or 'no clips found'})")


def _check_report(report: Path) -> None:
    """--report is a folder to create or fill: a file in its place (or its path's) fails now, not after the work."""
    for p in (report, *report.parents):
        if p.exists():
            if not p.is_dir():
                raise LipsyncError(f"--report {report}: {p} is a file, not a folder")
            return


@app.command("train")
def train_(
    ctx: typer.Context,
    model: Annotated[
        str, typer.Option("--model", "-m", help="sync | lips | seed | render, or package.module:factory.")
    ],
    manifest: Annotated[
        Path | None, typer.Option(help="Prepped shards (default: <data_dir>/prep/<prep_size>/manifest.json).")
    ] = None,
    gpus: Annotated[int | None, typer.Option(help="CUDA devices (N > 1: DDP via torchrun); 0: CPU.")] = None,
    procs: Annotated[int | None, typer.Option(help="CPU processes (DDP over gloo), instead of --gpus.")] = None,
    precision: Annotated[
        Precision | None, typer.Option(help=_d("16 is CUDA only; auto: bf16 on a GPU, 32 on a CPU.", "train_precision"))
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Samples per process and micro-batch.")] = None,
    accumulate: Annotated[int | None, typer.Option(help="Micro-batches per optimiser step.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many optimiser steps.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Stop after this much wall time.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (default: the model's).")] = None,
    val_every: Annotated[int | None, typer.Option(help="Validate every this many steps.")] = None,
    save_every: Annotated[int | None, typer.Option(help="Write the resumable last.* every this many steps.")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader workers per process.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", metavar="", help="Continue from last.* exactly where it stopped.")
    ] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh", metavar="", help="Start over, replacing an existing last.*.")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="TOML/JSON of model settings, plus an optional \\[train] table.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Run name (default: the model's).")] = None,
) -> None:
    """Train a model on prepped shards: checkpoints in <output_dir>/checkpoints/<name>/, TensorBoard in runs/<name>/."""
    from lipsync_cli import training

    s = _settings(ctx)
    base = training.TrainOptions(
        out_dir=s.output_dir,
        precision=s.train_precision,
        val_every=s.train_val_every,
        save_every=s.train_save_every,
        log_every=s.train_log_every,
        workers=s.train_workers,
        grad_clip=s.train_grad_clip,
        seed=s.seed,
    )
    flags = dict(
        name=name, gpus=gpus, precision=precision, batch_size=batch_size, accumulate=accumulate, max_steps=max_steps,
        max_minutes=max_minutes, lr=lr, val_every=val_every, save_every=save_every, workers=workers, resume=resume,
        fresh=fresh,
    )  # fmt: skip
    opts = training.merge(base, config, flags, procs=procs, default_max_steps=s.train_max_steps)
    manifest = manifest or s.data_dir / "prep" / str(s.prep_size) / "manifest.json"
    result = training.start(model, manifest, opts, procs)
    if result is not None:
        progress.log(f"[green]done[/] {escape(result.describe())}")
    if training.launched():
        training.exit_worker()


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Print the settings as JSON.")] = False,
) -> None:
    """Print every setting with its value (defaults < lipsync.toml < LIPSYNC_* env < flags)."""
    from rich.console import Console
    from rich.table import Table

    s: Settings = ctx.obj
    if as_json:
        _print_json(s.model_dump(mode="json"))
        return
    path = ctx.meta.get("config_file") or config_path()
    table = Table(title=f"settings (config file: {path}{'' if path.exists() else ', absent'})")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("env")
    table.add_column("meaning")
    for name, f in Settings.model_fields.items():
        table.add_row(name, plain(getattr(s, name)), f"LIPSYNC_{name.upper()}", f.description or "")
    Console().print(table)


def _terminated(signum, frame) -> None:
    """SIGTERM unwinds like an error, so every `with`/`finally` removes its temp files and stops its ffmpeg."""
    raise SystemExit(EXIT_TERMINATED)


@app.command("app")
def app_(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Address to listen on (0.0.0.0: reachable from other hosts).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
) -> None:
    """A local web page: upload a video, type the words or upload speech, watch and download the dub."""
    from lipsync_cli.errors import require

    for module in ("fastapi", "uvicorn", "multipart"):
        require(module, "app", "the web app")
    from lipsync_cli.app import serve

    serve(_settings(ctx), host=host, port=port)


EXIT_USER, EXIT_USAGE, EXIT_BUG, EXIT_INTERRUPTED = 1, 2, 3, 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, the shell's code for a process ended by SIGTERM


def _quiet_first(args: list[str]) -> list[str]:
    """-q/--quiet is accepted anywhere on the line (before a `--`): moved in front of the subcommand."""
    end = args.index("--") if "--" in args else len(args)
    quiet = [a for a in args[:end] if a in ("-q", "--quiet")]
    return quiet[:1] + [a for a in args[:end] if a not in ("-q", "--quiet")] + args[end:]


def main(args: list[str] | None = None) -> None:
    """Entry point. Exit codes: 0 done, 1 a user error (one `error:` line, never a traceback), 2 a usage error,
    3 a bug (please report), 130 interrupted (temp files removed, the terminal line ended), 143 terminated (SIGTERM,
    the same clean-up)."""
    signal.signal(signal.SIGTERM, _terminated)
    args = _quiet_first(sys.argv[1:] if args is None else list(args))
    try:
        app(args=args, prog_name="lipsync")
    except LipsyncError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USER)
    except SystemExit as e:
        if e.code == EXIT_INTERRUPTED:  # typer turns Ctrl-C into exit 130, after the `with` blocks cleaned up
            print("\ninterrupted", file=sys.stderr)
        elif e.code == EXIT_TERMINATED:  # _terminated, after the same clean-up
            print("\nterminated", file=sys.stderr)
        raise
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a bug: still one line and exit 3, with the traceback on request
        debug = bool(os.environ.get("LIPSYNC_DEBUG"))
        if debug:
            traceback.print_exc()
        print(
            f"error: unexpected {type(e).__name__}: {e}\n"
            f"This is a bug in lipsync {__version__}: please report it with the command you ran "
            f"and {'the traceback above' if debug else 'the traceback that LIPSYNC_DEBUG=1 prints'}.",
            file=sys.stderr,
        )
        sys.exit(EXIT_BUG)


if __name__ == "__main__":
    main()
