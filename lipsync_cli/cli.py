"""The `lipsync` command: one thin function per subcommand over importable functions. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lipsync_cli import progress
from lipsync_cli.errors import LipsyncError
from lipsync_cli.settings import Settings, config_path

app = typer.Typer(
    help="Lip-sync dubbing for the GPU-poor: make the person in a video say new words, offline, on a CPU.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Show the settings in force.", no_args_is_help=True)
app.add_typer(config_app, name="config")
data_app = typer.Typer(help="Fetch, import and list audio-visual corpora.", no_args_is_help=True)
app.add_typer(data_app, name="data")


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
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    if config is not None:
        if not config.exists():
            raise LipsyncError(f"config file not found: {config}")
        os.environ["LIPSYNC_CONFIG"] = str(config)
    try:
        settings = Settings()
    except Exception as e:  # pydantic's multi-line report, shortened to one line
        raise LipsyncError(f"invalid settings: {str(e).splitlines()[0]} {str(e).splitlines()[-2:]}") from e
    ctx.obj = settings.with_overrides(quiet=True) if quiet else settings
    progress.set_quiet(ctx.obj.quiet)


@app.command()
def dub(
    ctx: typer.Context,
    video: Annotated[Path, typer.Argument(help="The video of the person talking.")],
    text: Annotated[str | None, typer.Argument(help="The new words (or use --audio).")] = None,
    audio: Annotated[Path | None, typer.Option("--audio", "-a", help="Drive the mouth with this audio file.")] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Default: <video>.dubbed.mp4")] = None,
    force: Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")] = False,
    sync_mode: Annotated[str | None, typer.Option(help="Speech longer than the video: bounce | loop | cut.")] = None,
    face: Annotated[int | None, typer.Option("--face", help="Which face: 0 = largest, 1 = next, ...")] = None,
    engine: Annotated[str | None, typer.Option(help="Mouth engine: retrieval.")] = None,
    tts: Annotated[str | None, typer.Option(help="Text-to-speech backend: piper | espeak.")] = None,
    crf: Annotated[int | None, typer.Option(help="x264 quality, lower is better (default 18).")] = None,
) -> None:
    """Make the person in VIDEO say TEXT (or the speech in --audio)."""
    from lipsync_cli.dub import dub as run_dub

    s = _settings(ctx, sync_mode=sync_mode, face_index=face, engine=engine, tts=tts, crf=crf)
    result = run_dub(video, text, audio, output, s, force=force)
    progress.log(
        f"[green]wrote[/] {result.output}  ({result.frames} frames, {result.duration:.2f} s, "
        f"face in {result.faces_found:.0%} of input frames, {result.timings['total']:.1f} s)"
    )


@data_app.command("fetch")
def data_fetch(
    ctx: typer.Context,
    speakers: Annotated[str, typer.Option(help="'5' = s1..s5, '1,3,7', '2-4' or 'all'.")] = "1",
    source: Annotated[str | None, typer.Option(help="zenodo | sheffield")] = None,
    audio: Annotated[bool, typer.Option("--audio", help="Also the 25 kHz wav files.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print URLs and sizes; download nothing.")] = False,
    keep_archives: Annotated[bool, typer.Option("--keep-archives", help="Keep the zip/tar files.")] = False,
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
    Console().print(corpus_table(corpus_summary(s.data_dir / "raw")))


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


@app.command("prep")
def prep_(
    ctx: typer.Context,
    workers: Annotated[int | None, typer.Option(help="Parallel processes (default: settings.prep_workers).")] = None,
    size: Annotated[int | None, typer.Option(help="Aligned crop side in pixels: 96, 128 or 256.")] = None,
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
        str, typer.Option(help="lve, sync, closure, psnr, ssim, sharpness, stability: one, a comma list or all.")
    ] = "all",
    protocol: Annotated[str, typer.Option(help="reconstruct (ground truth) | cross (new speech) | all.")] = "all",
    engine: Annotated[str | None, typer.Option(help="Mouth engine to measure: retrieval.")] = None,
    videos: Annotated[Path | None, typer.Option(help="Video folder (or file). Default: <shared>/media.")] = None,
    speech: Annotated[Path | None, typer.Option(help="cross: speech folder or file. Default: <shared>/speech.")] = None,
    text: Annotated[str | None, typer.Option(help="cross: drive every video with TTS of this text instead.")] = None,
    grid: Annotated[Path | None, typer.Option(help="GRID speaker folder (video/, align/). Default: found.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many clips per protocol and corpus (0: all).")] = 8,
    report: Annotated[Path | None, typer.Option(help="Write metrics.json, plots, videos and index.html here.")] = None,
) -> None:
    """Measure an engine against real footage and three baselines (real, frozen mouth, unchanged video)."""
    from lipsync_cli.eval import protocols
    from lipsync_cli.eval import report as rep

    s = _settings(ctx, engine=engine)
    metrics = protocols.parse_metrics(metric)
    chosen = protocols.parse_protocols(protocol)
    hook = rep.SideBySide(report / "videos") if report is not None else None
    run = protocols.evaluate(
        s, metrics, chosen, videos=videos, speech=speech, text=text, grid=grid, limit=limit or None, on_clip=hook
    )
    rep.print_report(run)
    if report is not None:
        progress.log(f"[green]wrote[/] {rep.write_report(run, report, hook)}")


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print every setting with its value (defaults < lipsync.toml < LIPSYNC_* env < flags)."""
    from rich.console import Console
    from rich.table import Table

    s: Settings = ctx.obj
    table = Table(title=f"settings (config file: {config_path()}{'' if config_path().exists() else ', absent'})")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("env")
    table.add_column("meaning")
    for name, f in Settings.model_fields.items():
        table.add_row(name, repr(getattr(s, name)), f"LIPSYNC_{name.upper()}", f.description or "")
    Console().print(table)


def main() -> None:
    """Entry point: user-facing errors become one line on stderr and a non-zero exit code, never a traceback."""
    try:
        app()
    except LipsyncError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug: still one line, with a way to see more
        if os.environ.get("LIPSYNC_DEBUG"):
            raise
        print(
            f"error: unexpected {type(e).__name__}: {e} (set LIPSYNC_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    main()
