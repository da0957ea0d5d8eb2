"""A budget of request body bytes, taken before a body is read.

The batcher admits requests by their images, which are known only once the
body has been read and parsed. Until then a request costs its body in memory
(the raw bytes, then the parsed base64 strings), whether or not it is
admitted afterwards; with enough concurrent clients that alone outgrows any
queue bound. :class:`ByteBudget` counts the declared sizes of the bodies
being read or served, so the HTTP layer can refuse a request (429) before
reading a byte of it.

Used from the event loop only (no lock needed).
"""

from __future__ import annotations


class ByteBudget:
    """At most ``limit`` bytes reserved at once."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.used = 0

    def try_reserve(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (and nothing reserved) if they do not fit."""
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def release(self, n: int) -> None:
        self.used -= n
