"""bench.launches on the installed Triton: the JIT's own warmup and compile hooks give the variants a launch
compiles, for sm_90, without a GPU. These are the Triton surfaces the benchmarks rely on; CI runs them on every
Triton it tests, in processes without TRITON_INTERPRET (the real kernels are needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repository root, for `bench`

from bench.launches import run_without_interpreter  # noqa: E402


def run_compiled(code: str) -> str:
    """Run `code` in a fresh interpreter without TRITON_INTERPRET; its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    return run.stdout


def test_no_rank_adds_a_variant_at_one_adapter_width():
    # The kernels read the rank from a device tensor: at one width (r_max = 64) every rank,
    # in every rank bucket, launches the variants the first one compiled.
    out = run_without_interpreter("bench.launches", ["--M", 16, "--K", 16, "--N", 32, "--dtype", "fp32",
                                                     "--ranks", 1, 2, 16, 17, 33, 64], timeout=300).stdout
    counts = json.loads(out)
    assert {"_skinny_product_kernel", "_fused_forward_kernel", "_fused_grad_x_kernel",
            "_lora_grad_weight_kernel"} <= set(counts)
    for name, per_rank in counts.items():
        assert per_rank["1"] > 0 and len(set(per_rank.values())) == 1, (name, per_rank)


def test_specialization_is_the_jits_and_compiles_for_sm90():
    out = run_compiled(
        "import json, torch\n"
        "from bench import launches\n"
        "launch = [l for l in launches.capture(64, 32, 48, 5, torch.float32) "
        "          if l.name == '_fused_forward_kernel'][0]\n"
        "config = launches.candidate_configs(launch)[0]\n"
        "spec = launches.specialize(launch, config)\n"
        "again = launches.specialize(launch, config)\n"
        "mask = [l for l in launches.capture(64, 32, 48, 5, torch.float32, dropout_p=0.1) "
        "        if l.name == '_keep_mask_kernel'][0]\n"
        "compiled = launches.compile_launch(mask, None)\n"
        "print(json.dumps({'key': spec.key, 'same': spec.key == again.key, 'signature': spec.signature,\n"
        "                  'constants': [str(k) for k in spec.constants], 'attrs': str(spec.attrs),\n"
        "                  'options': spec.options, 'config': config.all_kwargs(),\n"
        "                  'cubin': len(compiled.asm['cubin']), 'warps': compiled.metadata.num_warps}))\n")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["same"] and result["key"]
    assert any(t == "*fp32" for t in result["signature"].values()), result["signature"]
    assert "tt.divisibility" in result["attrs"]  # the 16-byte aligned pointers and sizes
    for name in ("num_warps", "num_stages"):
        assert result["options"][name] == result["config"][name]
    assert result["cubin"] > 0 and result["warps"] >= 1


def test_the_compile_only_driver_is_restored_and_refuses_what_it_cannot_answer():
    out = run_compiled(
        "from triton.runtime import driver\n"
        "from bench import launches\n"
        "before = driver._active\n"
        "with launches.target_driver() as stand_in:\n"
        "    assert driver.active is stand_in and stand_in.get_current_target().arch == 90\n"
        "    try:\n"
        "        stand_in.utils\n"
        "    except RuntimeError as error:\n"
        "        print(error)\n"
        "assert driver._active is before\n"
        "print('restored')\n")
    assert "asked the compile-only driver for 'utils'" in out and "restored" in out


def test_compiles_are_counted_through_the_post_compile_hook():
    out = run_compiled(
        "import torch\n"
        "from triton import knobs\n"
        "from bench import launches\n"
        "mask = [l for l in launches.capture(64, 32, 48, 5, torch.float32, dropout_p=0.1) "
        "        if l.name == '_keep_mask_kernel'][0]\n"
        "with launches.counting_compiles() as compiles:\n"
        "    launches.compile_launch(mask, None)\n"
        "    launches.compile_launch(mask, None)  # a fresh device key: the JIT compiles again\n"
        "assert knobs.runtime.jit_post_compile_hook is None\n"
        "print(compiles.counts())\n")
    assert "{'_keep_mask_kernel': 2}" in out
