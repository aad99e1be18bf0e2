"""A pickle that runs code when loaded, to prove checkpoints are never unpickled unsafely."""

from pathlib import Path


def _touch(path: str) -> None:
    Path(path).write_text("code ran")


class Payload:
    """Unpickling this runs ``_touch`` (creates ``marker``): the classic pickle attack."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _touch, (str(self.marker),)
