"""The one exception type users see: its message is printed as a single line, exit code 1."""


class LipsyncError(Exception):
    """A problem with the user's input or environment, explained in one line (no traceback)."""


def require(module: str, extra: str, what: str) -> None:
    """A clear error when an optional extra is not installed (instead of an ImportError traceback)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LipsyncError(f'{what} needs {module.split(".")[0]}: pip install "lipsync-cli[{extra}]"')
