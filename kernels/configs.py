"""Launch settings shared by the kernels: autotune configs and the rank bucket.

Autotuning is collapsed to one small config under ``TRITON_INTERPRET=1`` so
that the CPU interpreter stays quick; on a GPU the configs cover Hopper (large
tiles, deep pipelines for wgmma) and Ampere (smaller tiles, fewer stages).
"""

import triton

from .interpreter import interpreter_enabled
from .tiling import next_power_of_2

# The rank is read by the kernels from a device tensor, so no launch argument
# depends on it. Kernels tile the adapter width R in chunks of BLOCK_R columns,
# a compile-time constant taken from the bucket of R (16, 32 or 64): every rank
# 1..R reuses one compiled kernel, widths above 64 loop over 64-wide chunks,
# and only a rank cut (a new R) can compile again.
MIN_RANK_BLOCK = 16  # tl.dot needs every dimension >= 16
MAX_RANK_BLOCK = 64


def rank_block(rank: int) -> int:
    """The compile-time rank chunk for an adapter of width ``rank`` (R): next power of two, clamped to [16, 64]."""
    return min(MAX_RANK_BLOCK, max(MIN_RANK_BLOCK, next_power_of_2(rank)))


# Autotune keys hold a bucket of the row count M, never M itself: with dynamic
# padding, or batches of other lengths, most steps present a new M, and each
# new key would time every config again (on every process). The bucket is the
# next power of two, so a key is at most twice its smallest M and 1..70,000
# rows make 14 keys; below 16 rows every config computes one row tile,
# so those share a key. Launch grids use the exact M. Kernels take the bucket
# as an argument they do not read (M_BUCKET, do_not_specialize, so that its
# value compiles nothing).
MIN_M_BUCKET = 16


def m_bucket(M: int) -> int:
    """The autotune key's stand-in for M rows: the next power of two, at least MIN_M_BUCKET."""
    return max(MIN_M_BUCKET, next_power_of_2(M))


# A thread holding more than this many elements of an output tile spills on
# sm_90 in three cases (cuobjdump --dump-resource-usage): with dropout, where it
# also holds Philox words for its share of the mask tile; in the dX kernel,
# whose transposed W operand needs more address registers than the forward; and
# in the forward with nn.Linear's transposed W and a 64-wide rank block.
MAX_TILE_ELEMENTS_PER_THREAD = 64


def limit_tile_per_thread(rows: str, cols: str, only_with_dropout: bool = True, when=None):
    """An ``early_config_prune`` that drops tiles of rows x cols above the per-thread limit.

    With ``only_with_dropout`` the limit applies only to launches with HAS_DROPOUT;
    ``when(named_args, kwargs)``, if given, decides instead.
    """

    def prune(configs, named_args, **kwargs):
        applies = when(named_args, kwargs) if when is not None else (
            not only_with_dropout or kwargs.get("HAS_DROPOUT", False))
        if not applies:
            return configs
        fitting = [c for c in configs
                   if c.kwargs[rows] * c.kwargs[cols] <= MAX_TILE_ELEMENTS_PER_THREAD * 32 * c.num_warps]
        return fitting or configs

    return prune


def transposed_weight_at_widest_rank_block(named_args, kwargs):
    """The forward GEMM's spilling case on sm_90: W read through a transpose (nn.Linear's
    [N, K] weight, unit stride along K) with the widest rank block (a 64-column B tile).
    ``stride_wk`` is in that kernel's autotune key, so the two layouts are tuned apart."""
    return kwargs.get("BLOCK_R") == MAX_RANK_BLOCK and named_args.get("stride_wk") == 1


def _config(num_warps, num_stages, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)


def _interpreter_config(**blocks):
    return [triton.Config(blocks, num_warps=1, num_stages=1)]


def gemm_configs():
    """Tiles for the frozen-weight GEMMs (forward Y and backward dX): BLOCK_M x BLOCK_N, reducing BLOCK_K."""
    if interpreter_enabled():
        return _interpreter_config(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
    return [
        # Hopper: 128-row tiles map onto one warpgroup-wide wgmma; 8 warps, deep pipelines.
        _config(8, 4, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _config(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8),
        _config(8, 4, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(8, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8),
        _config(4, 5, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
        # Ampere and small M: fewer stages fit in shared memory.
        _config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=8),
        _config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8),
    ]


def down_configs():
    """Tiles for the skinny products S = D(X) A and dS = dY B^T: BLOCK_M rows, reducing BLOCK_K."""
    if interpreter_enabled():
        return _interpreter_config(BLOCK_M=16, BLOCK_K=16)
    return [
        _config(4, 4, BLOCK_M=64, BLOCK_K=128),
        _config(4, 3, BLOCK_M=128, BLOCK_K=64),
        _config(8, 3, BLOCK_M=128, BLOCK_K=128),
        _config(4, 4, BLOCK_M=64, BLOCK_K=64),
    ]


def weight_grad_configs():
    """Tiles for dA and dB: BLOCK_C output columns (K for dA, N for dB), reducing BLOCK_M rows."""
    if interpreter_enabled():
        return _interpreter_config(BLOCK_C=16, BLOCK_M=16)
    return [
        _config(4, 4, BLOCK_C=128, BLOCK_M=64),
        _config(4, 3, BLOCK_C=128, BLOCK_M=128),
        _config(8, 3, BLOCK_C=256, BLOCK_M=64),
        _config(4, 4, BLOCK_C=64, BLOCK_M=128),
        _config(4, 4, BLOCK_C=64, BLOCK_M=64),
    ]
