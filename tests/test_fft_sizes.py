"""Fast FFT sizes: products of 2, 3 and 5 only."""

from gpustack.kernels.fft_sizes import fast_size, fast_size_below, is_fast


def test_fast_sizes_known_answers():
    assert [n for n in range(1, 31) if is_fast(n)] == [1, 2, 3, 4, 5, 6, 8, 9, 10, 12, 15, 16, 18, 20, 24, 25, 27,
                                                         30]
    assert not is_fast(0) and not is_fast(451) and is_fast(2000)
    assert (fast_size(451), fast_size_below(451)) == (480, 450)  # 451 = 11 x 41
    assert (fast_size(901), fast_size_below(901)) == (960, 900)  # 901 = 17 x 53
    assert fast_size(2000) == fast_size_below(2000) == 2000
    assert fast_size(1) == fast_size_below(1) == 1
