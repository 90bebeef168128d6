"""Server-side pages of long lists (endpoints, identities, ipcache, the matrix), so that a
host with 1,000 identities still gives small pages.

Query parameters: a page number per list (``page``, ``ipage``, ``cpage``, ...; 1 is the
first) and ``per_page`` (rows per page; omitted, the area's default; at most MAX_PER_PAGE).
A number that is not a positive integer is a 400; a page past the end shows the last one.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from flask import abort

MAX_PER_PAGE = 500


@dataclass(frozen=True)
class Page:
    """Page ``page`` (1-based) of ``total`` items, ``per_page`` a page."""

    page: int
    per_page: int
    total: int

    @property
    def pages(self) -> int:
        return max(1, -(-self.total // self.per_page))

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def slice(self, items: list) -> list:
        return items[self.offset:self.offset + self.per_page]

    def to_dict(self) -> dict:
        """What the pager macro and /api/v1 show: first and last are 1-based positions
        (0 and 0 for an empty list)."""
        last = min(self.total, self.offset + self.per_page)
        return {**asdict(self), "pages": self.pages, "first": self.offset + 1 if last else 0,
                "last": last}


def number(args, name: str, default: int, maximum: int | None = None) -> int:
    raw = (args.get(name) or "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        abort(400, f"{name} must be a positive integer")
    value = int(raw)
    if maximum is not None and value > maximum:
        abort(400, f"{name} is at most {maximum}")
    return value


def page_of(total: int, page: int, per_page: int) -> Page:
    """The asked page, moved back to the last one when it is past the end."""
    last = max(1, -(-total // per_page))
    return Page(min(page, last), per_page, total)


def window(p: Page, around: int = 2) -> list[int | None]:
    """Page links to show: the first, the last and ``around`` each side of the current
    one; None marks a gap (drawn as an ellipsis)."""
    keep = sorted({1, p.pages, *range(max(1, p.page - around), min(p.pages, p.page + around) + 1)})
    out: list[int | None] = []
    for n in keep:
        if out and n - (out[-1] or 0) > 1:
            out.append(None)
        out.append(n)
    return out
