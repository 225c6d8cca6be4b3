"""The one exception type users see."""


class MimicError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. The CLI prints it as one line."""


def one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (PIL, datasets and transformers messages span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
