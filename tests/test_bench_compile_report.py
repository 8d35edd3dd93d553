"""The Hopper compile report: its cuobjdump readers, and the real kernels compiled for sm_90 without a GPU.

The compile test builds, per kernel, the configs a GPU run's autotuner chose (from the latest committed
bench/results file with autotune rows) or, before any GPU run, the first config of each kernel that can
launch on sm_90, at GPT-2's shape as training runs it (bf16 x, fp32 adapters under autocast, r = 64 and
dropout on: the original's settings). It fails when such a config spills, or when a frozen-weight GEMM
kernel has no HGMMA. bench/results/compile-sm90.md covers every config, rank bucket and adapter dtype.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for `bench`

from bench import compile_report, report  # noqa: E402
from bench.launches import run_without_interpreter  # noqa: E402
from bench.record import read_csv  # noqa: E402

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _fused_grad_x_kernel:
  REG:255 STACK:3992 SHARED:1024 LOCAL:0 CONSTANT[0]:648 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : _fused_forward_kernel
        /*0000*/                   LDC R1, c[0x0][0x28] ;                                 /* 0x00000a00ff017b82 */
        /*1e50*/                   WARPGROUP.ARRIVE ;                                     /* 0x00000000000079c5 */
        /*1e60*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;  /* 0x43e00000081879f0 */
        /*1eb0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24 ;  /* 0x43e00000081879f0 */
        /*1f00*/              @!P1 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                  /* 0x000000000c04723c */
        /*1f10*/               @P0 STL.64 [R1+0x10], R2 ;                                 /* 0x0000100201000387 */
        /*1f20*/                   LDL R5, [R1+0x10] ;                                    /* 0x0000100001057983 */
        /*1f30*/                   STS.128 [R3], R8 ;                                     /* 0x0000000803007388 */
"""


def test_resource_usage_reader():
    assert compile_report.parse_resource_usage(RESOURCE_USAGE) == {
        "registers": 255, "stack_bytes": 3992, "static_shared_bytes": 1024, "local_bytes": 0}
    with pytest.raises(ValueError, match="REG"):
        compile_report.parse_resource_usage("no usage here")


def test_sass_reader_counts_matrix_and_local_memory_instructions():
    assert compile_report.parse_sass(SASS) == {"hgmma": 2, "hmma": 1, "spill_instructions": 2}


def test_violations_flag_spills_and_gemms_without_hgmma_only_where_a_config_can_launch():
    ok = {"kernel": "k", "config": "c", "dtype": "bf16", "block_r": 64, "dropout": 0.05, "status": "ok",
          "can_launch": "True", "role": "gemm", "registers": 128, "local_bytes": 0, "stack_bytes": 0,
          "spill_instructions": 0, "hgmma": 8, "hmma": 0}
    assert compile_report.violations([ok]) == []
    assert "spills" in compile_report.violations([{**ok, "stack_bytes": 16}])[0]
    assert "no HGMMA" in compile_report.violations([{**ok, "hgmma": 0, "hmma": 8}])[0]
    assert compile_report.violations([{**ok, "role": "skinny", "hgmma": 0, "hmma": 8}]) == []
    assert compile_report.violations([{**ok, "can_launch": "False", "stack_bytes": 16}]) == []


def _chosen_file():
    """The latest committed GPU results file that records the autotuner's choices, if any."""
    for path in reversed(report.gpu_result_files()):
        if any(row.get("bench") == "autotune" for row in read_csv(path)):
            return path
    return None


@pytest.mark.slow
def test_chosen_configs_compile_for_sm90_without_spills_and_gemms_use_hgmma(tmp_path):
    chosen = _chosen_file()
    selection = ["--configs", "chosen", "--chosen", chosen] if chosen else ["--configs", "first-fit"]
    run = run_without_interpreter("bench.compile_report", [
        *selection, "--ranks", 64, "--dropouts", 0.05, "--adapter-dtypes", "fp32", "--jobs", 2,
        "--out-dir", tmp_path, "--name", "chosen"],
        timeout=600, check=False)
    csv_path = tmp_path / "chosen.csv"
    assert csv_path.exists(), f"no report written:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    rows = read_csv(csv_path)
    kernels = {row["kernel"] for row in rows}
    assert {"_skinny_product_kernel", "_fused_forward_kernel", "_fused_grad_x_kernel",
            "_lora_grad_weight_kernel"} <= kernels
    for kernel in kernels:
        assert any(row["kernel"] == kernel and row["can_launch"] == "True" for row in rows), \
            f"{kernel}: no compiled config can launch on sm_90"
    found = compile_report.violations(rows)
    assert not found, "findings of the sm_90 compile report:\n" + "\n".join(found)
    assert run.returncode == 0, run.stdout[-3000:]
