"""One exception type for every user-facing failure.

The CLI prints ``GradSAEError`` as a single line (``error: <message>``) and exits
with status 2; each message names the fix. Library callers catch it like any
``ValueError``.
"""

from __future__ import annotations


class GradSAEError(ValueError):
    """A problem with the user's input or set-up, with the fix in its message."""
