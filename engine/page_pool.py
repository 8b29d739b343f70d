"""Page allocator for the paged KV cache: which pages are free, who holds the rest."""

from __future__ import annotations

from engine.errors import OutOfPages

PAGE_SIZE = 16


def pages_needed(num_tokens: int, page_size: int = PAGE_SIZE) -> int:
    return (num_tokens + page_size - 1) // page_size


class PagePool:
    """A free list of page ids. `allocate` / `free` are the only ways pages change hands.

    Freeing a page that is not allocated raises: a double free is a bookkeeping bug
    we want loud, not a silently shared page.
    """

    def __init__(self, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError(f"num_pages must be positive, got {num_pages}")
        self.num_pages = num_pages
        # Pop from the end: low page ids are handed out first, which keeps tests readable.
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def is_full(self) -> bool:
        """True when every page is back in the pool."""
        return len(self._free) == self.num_pages

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise ValueError(f"cannot allocate {n} pages")
        if n > len(self._free):
            raise OutOfPages(f"need {n} KV pages, {len(self._free)} of {self.num_pages} free")
        pages = [self._free.pop() for _ in range(n)]
        self._used.update(pages)
        return pages

    def truncate(self, pages: list[int], num_tokens: int, page_size: int = PAGE_SIZE) -> list[int]:
        """Keep the pages that hold the first num_tokens tokens, free the rest -> kept pages.

        Speculative decoding rolls back rejected drafts this way: a page that only held
        rejected positions goes back to the pool at once."""
        keep = pages_needed(num_tokens, page_size)
        if keep < len(pages):
            self.free(pages[keep:])
        return pages[:keep]

    def free(self, pages: list[int]) -> None:
        bad = [p for p in pages if p not in self._used]
        if bad or len(set(pages)) != len(pages):
            raise RuntimeError(f"freeing pages that are not allocated: {bad or pages}")
        self._used.difference_update(pages)
        self._free.extend(reversed(pages))
