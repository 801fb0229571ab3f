"""tinylm.backend.blas_threads: NumPy's OpenBLAS thread count, changed for a block only."""

from __future__ import annotations

import pytest

from tinylm.backend import blas_threads, blas_threads_now


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_blas_threads_refuses_a_count_that_is_not_a_positive_integer(bad):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        with blas_threads(bad):
            pass


def test_blas_threads_sets_the_count_inside_the_block_and_restores_it_after():
    before = blas_threads_now()
    if before is None:
        pytest.skip("NumPy's BLAS here is not an OpenBLAS that blas_threads can find")
    other = 1 if before != 1 else 2
    with blas_threads(other) as applied:
        assert applied is True
        assert blas_threads_now() == other
    assert blas_threads_now() == before
    with pytest.raises(RuntimeError, match="inside"):
        with blas_threads(other):
            raise RuntimeError("inside")
    assert blas_threads_now() == before  # restored after an exception too
