"""Small typed errors whose messages say what was wrong and what to do instead."""


class CellSegError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidImageError(CellSegError):
    """The bytes are not an image we can read (not an image, truncated, several frames, too small)."""


class UnsupportedImageError(InvalidImageError):
    """The bytes are not an image at all, or an image format or pixel mode we do not read."""


class ImageTooLargeError(InvalidImageError):
    """The image declares more pixels than allowed; raised before any pixel memory is allocated."""


class InvalidRLEError(CellSegError, ValueError):
    """A run-length encoding is malformed or does not fit its image."""


class DatasetError(CellSegError):
    """A labelled folder has problems; the message lists every one with its file (and line, in a CSV)."""


class CheckpointError(CellSegError):
    """A model folder is missing, incomplete or corrupt; the message names the file and the problem."""


class InvalidOptionError(CellSegError, ValueError):
    """An inference option (threshold, mode) is outside what the model allows."""
