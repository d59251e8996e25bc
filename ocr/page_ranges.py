"""Page ranges as clients write them: ``1-3,7`` (1-based, inclusive) -> sorted 0-based pages."""
from __future__ import annotations

import re

from core.errors import InvalidParameter

MAX_PAGE = 100_000
_PART = re.compile(r"^\s*(\d{1,6})\s*(?:-\s*(\d{1,6})\s*)?$")


def parse_pages(spec: str | None) -> list[int] | None:
    """None for an empty spec; 422 ``INVALID_PAGES`` for one that is not ranges of 1-based pages."""
    if spec is None or not spec.strip():
        return None
    pages: set[int] = set()
    for part in spec.split(","):
        m = _PART.match(part)
        if m is None:
            raise InvalidParameter("pages must be 1-based pages and ranges such as 1-3,7", param="pages",
                                   code="INVALID_PAGES")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        if first < 1 or last < first or last > MAX_PAGE:
            raise InvalidParameter(f"'{part.strip()}' is not a page range (pages are numbered from 1, first <= last)",
                                   param="pages", code="INVALID_PAGES")
        pages.update(range(first - 1, last))
    return sorted(pages)
