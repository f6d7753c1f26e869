"""The one exception type users see: a one-line message that names the fix."""


class MpqError(Exception):
    """A user-facing error. ``str(err)`` is a single line naming the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
