"""The one data error a user can fix: the dataset is not where the config says it is."""

from __future__ import annotations


class DatasetNotFound(FileNotFoundError):
    """A dataset is missing, incomplete or could not be fetched.

    The message is one line naming the place looked in and how to get the data, so the CLI
    can print it as-is (`searchkd: error: ...`) without a traceback. It subclasses
    FileNotFoundError so code that already handles missing files handles this too.
    """


def one_line(err: BaseException) -> str:
    """An underlying error squeezed into a fragment of our one-line message."""
    return " ".join(str(err).split()) or type(err).__name__
