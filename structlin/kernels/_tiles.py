"""Triton helpers shared by the kernels (imported lazily, like the kernels themselves)."""
import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of program `pid` over an M × N output in BM × BN tiles, launched
    GROUP_M row blocks at a time so that consecutive programs share their A rows and B columns in L2."""
    num_m, num_n = tl.cdiv(M, BM), tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % gsize, (pid % group) // gsize
