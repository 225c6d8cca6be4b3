"""The one exception type users see."""


class MimicError(Exception):
    """A user-facing error: bad input, a missing file, a mismatch. The CLI prints it as one line."""
