"""Developer sessions: `nox -s tests`, `nox -s lint`. Each installs the project as the README says."""

import nox

nox.options.sessions = ["lint", "tests"]
PY = "3.11"


def install(session: nox.Session) -> None:
    # a local CPU torch first: an unpinned torch pulls GBs of CUDA wheels
    session.install("torch==2.13.0", "-e", ".[dev]")  # CI pin; README: CPU index


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    install(session)
    session.run("pytest", *session.posargs)


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.5")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    install(session)
    session.run("python", "benchmarks/dub_speed.py", *session.posargs)
