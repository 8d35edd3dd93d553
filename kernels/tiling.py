"""Program-to-tile mapping shared by the GEMM kernels, and the launchers' host-side tile arithmetic."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program `pid` over an [M, N] output, GROUP_M row tiles at a time.

    Walking GROUP_M row tiles down one column before moving right makes
    neighbouring programs share their column operand in L2. The row tile is
    int64 because row offsets times strides can pass 2**31.
    """
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = (first_pid_m + (pid % group_size) % group_m).to(tl.int64)
    pid_n = (pid % group_size) // group_m
    return pid_m, pid_n


# The launchers' integer arithmetic in plain Python. triton.cdiv and
# triton.next_power_of_2 are constexpr functions, callable from kernels too:
# from Python each call costs microseconds of wrapping, and one layer call
# (forward and backward) makes about twenty of them on the host.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
