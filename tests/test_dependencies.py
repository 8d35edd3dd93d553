"""What a bare install needs: the package, the op, the layers, the reference and the benchmarks import
nothing but torch, triton, transformers and numpy (and their own dependencies); `datasets` only where hub
data is loaded, with an error that says how to install it when it is missing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("datasets", "peft", "matplotlib", "pandas", "pyarrow", "pytest", "accelerate")


def run_without_optional(code):
    """Run `code` in a fresh interpreter in which importing any OPTIONAL package fails."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in OPTIONAL)
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT,
                          env=None, timeout=300)


def test_package_op_layers_reference_and_bench_import_without_optional_packages():
    run = run_without_optional(
        "import hybrid_lora, hybrid_lora.ops.fused_lora, hybrid_lora.nn.layer, hybrid_lora.ops.reference, hybrid_lora.experiments.data\n"
        "import bench.launches, bench.suite, bench.compile_report, bench.rank_sweep, bench.providers, bench.e2e\n"
        "import bench.report, bench.memory, bench.layer_bench\n"
        "print('imported')\n")
    assert run.returncode == 0 and "imported" in run.stdout, run.stderr[-3000:]


def test_embedded_corpus_and_local_files_load_without_datasets(tmp_path):
    (tmp_path / "notes.txt").write_text("".join(f"note {i}\n" for i in range(12)))
    (tmp_path / "notes.jsonl").write_text("".join(f'{{"text": "row {i}", "id": {i}}}\n' for i in range(12)))
    (tmp_path / "notes.csv").write_text("id,text\n" + "".join(f'{i},"row, {i}"\n' for i in range(12)))
    run = run_without_optional(
        "from hybrid_lora.experiments import data\n"
        "train, evaluation = data.load_texts('embedded-a', n_train=5, n_eval=3)\n"
        "assert len(train) == 5 and len(evaluation) == 3\n"
        f"for suffix in ('txt', 'jsonl', 'csv'):\n"
        f"    train, evaluation = data.load_texts({str(tmp_path)!r} + '/notes.' + suffix, n_train=8, n_eval=4)\n"
        "    assert len(train) == 8 and len(evaluation) == 4 and not set(train) & set(evaluation), suffix\n"
        "print('loaded')\n")
    assert run.returncode == 0 and "loaded" in run.stdout, run.stderr[-3000:]


def test_hub_data_without_datasets_says_how_to_install_it():
    run = run_without_optional(
        "from hybrid_lora.experiments import data\n"
        "try:\n"
        "    data.load_texts('imdb', n_train=1, n_eval=1)\n"
        "except data.Unavailable as error:\n"
        "    print('error:', error)\n")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "error: dataset 'imdb' is read with the 'datasets' package, which is not installed" in run.stdout
    assert 'pip install "hybrid-lora[hub]"' in run.stdout


def test_local_files_read_every_format_in_file_order(tmp_path):
    from hybrid_lora.experiments.data import read_text_file

    (tmp_path / "a.txt").write_text("first\n\n  \nsecond line, with a comma\n")
    assert read_text_file(tmp_path / "a.txt") == ["first", "second line, with a comma"]
    (tmp_path / "a.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two \\"quoted\\""}\n{"text": ""}\n')
    assert read_text_file(tmp_path / "a.jsonl") == ["one", 'two "quoted"']
    (tmp_path / "a.csv").write_text('id,text\n1,"a, b"\n2,"multi\nline"\n3,\n')
    assert read_text_file(tmp_path / "a.csv") == ["a, b", "multi\nline"]
