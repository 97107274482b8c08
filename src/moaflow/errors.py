"""The errors moaflow reports as one line naming the file, key or value at fault.

The command line catches `MoaflowError` (and the standard `ValueError` and
`FileNotFoundError`) and prints the message without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MoaflowError(Exception):
    """Base of the errors that describe bad input rather than a bug."""


class DownloadError(MoaflowError):
    """A file could not be fetched from any mirror."""


class VerificationError(MoaflowError):
    """A fetched, extracted or read file failed its integrity or content check."""


class MetadataError(MoaflowError, ValueError):
    """A metadata table lacks what the pipeline needs, or contradicts itself."""
