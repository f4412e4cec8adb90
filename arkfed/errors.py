"""One exception type whose message is shown to users as a single line.

Everything a user can cause (a missing file, a bad column, a label value outside the schema, a
site that dies) raises :class:`ArkfedError` with a message naming the site, file, row or column
and, where possible, what to do about it. The CLI prints it without a traceback.
"""

from __future__ import annotations


class ArkfedError(Exception):
    """A user-facing error; ``str(err)`` is one line that names what is wrong and where."""

    def __init__(self, message: str, *, site: str | None = None):
        self.site = site
        prefix = f"site {site!r}: " if site else ""
        super().__init__(prefix + " ".join(str(message).split()))

    def for_site(self, site: str) -> "ArkfedError":
        """The same error, prefixed with the site it happened at (no-op if already named)."""
        if self.site is not None:
            return self
        return ArkfedError(str(self), site=site)


class NonFiniteError(ArkfedError):
    """A loss or a weight became NaN/Inf; ``category`` is what the site sends (never the values)."""

    def __init__(self, message: str, *, site: str | None = None, category: str = "non_finite_update"):
        super().__init__(message, site=site)
        self.category = category
