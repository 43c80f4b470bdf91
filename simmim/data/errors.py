"""The data errors and warnings users see: one line each, saying what to change."""

from __future__ import annotations

import warnings

__all__ = ["BadImageWarning", "DataError", "TooManyBadFilesError", "show_bad_images_plainly"]


class BadImageWarning(UserWarning):
    """An unreadable image was skipped and replaced by another sample."""


def show_bad_images_plainly() -> None:
    """For command lines: print each :class:`BadImageWarning` as one ``warning: ...`` line, without the Python
    source line that the default format adds (set before DataLoader workers start, so they inherit it)."""
    default = warnings.formatwarning

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, BadImageWarning):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


class DataError(ValueError):
    """A data problem found once training runs (too few images for a batch, too many unreadable files), with a
    one-line message saying what to change.

    Raised in a DataLoader worker, it reaches the main process re-raised by PyTorch as the same class with the
    message "Caught ... Original Traceback ...": the user's sentence is then the last line (after
    ``module.Class: ``); :attr:`summary` returns that sentence in both cases. The class takes a single message
    string, so PyTorch can re-create it.
    """

    @property
    def summary(self) -> str:
        """The one-line message for the user, also when PyTorch re-raised this from a DataLoader worker."""
        lines = str(self).strip().splitlines()
        line = lines[-1] if lines else ""
        for prefix in (f"{type(self).__module__}.{type(self).__qualname__}: ", f"{type(self).__qualname__}: "):
            line = line.removeprefix(prefix)
        return line


class TooManyBadFilesError(DataError, RuntimeError):
    """More than ``max_bad_files`` unreadable images, or no readable image left (a RuntimeError too, as before)."""
