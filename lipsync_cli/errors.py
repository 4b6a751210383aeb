"""The one exception type users see: its message is printed as a single line, exit code 1."""


class LipsyncError(Exception):
    """A problem with the user's input or environment, explained in one line (no traceback)."""


def require(module: str, extra: str, what: str) -> None:
    """A clear error when an optional extra is not installed (instead of an ImportError traceback)."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise LipsyncError(f'{what} needs {module.split(".")[0]}: pip install "lipsync-cli[{extra}]"')


def reason(e: BaseException) -> str:
    """An exception's message as one line for an `error:` line: its first line, or the line after a heading that
    ends in ':' (torch's "Error(s) in loading state_dict for X:" then the mismatch), or its type when it is empty."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
