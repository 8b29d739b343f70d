import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.errors import OutOfPages
from engine.page_pool import PagePool, pages_needed


def test_pages_needed():
    assert [pages_needed(n) for n in (0, 1, 16, 17, 32, 33)] == [0, 1, 1, 2, 2, 3]


def test_out_of_pages_and_double_free():
    pool = PagePool(4)
    a = pool.allocate(3)
    with pytest.raises(OutOfPages):
        pool.allocate(2)
    pool.free(a[:1])
    with pytest.raises(RuntimeError):
        pool.free(a[:1])
    with pytest.raises(RuntimeError):
        pool.free([99])
    pool.free(a[1:])
    assert pool.is_full()


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.lists(st.tuples(st.booleans(), st.integers(0, 20)), max_size=60))
def test_allocate_free_never_double_allocates(num_pages, ops):
    pool = PagePool(num_pages)
    held: list[list[int]] = []
    for is_alloc, n in ops:
        if is_alloc or not held:
            if pool.can_allocate(n):
                held.append(pool.allocate(n))
            else:
                with pytest.raises(OutOfPages):
                    pool.allocate(n)
        else:
            pool.free(held.pop(n % len(held)))
        flat = [p for h in held for p in h]
        assert len(flat) == len(set(flat)), "a page was handed out twice"
        assert all(0 <= p < num_pages for p in flat)
        assert pool.num_free + len(flat) == num_pages
    for h in held:
        pool.free(h)
    assert pool.is_full()
