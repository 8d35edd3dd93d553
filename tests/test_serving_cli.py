"""``hybrid-lora generate``: prompts at their own adapter and rank, in batches, into a completions file."""

import json

import pytest
import torch

from hybrid_lora.cli import main
from hybrid_lora.io.models import EMBEDDED_MODEL_DIR, load_tokenizer
from serving_helpers import adapter_paths, base, merged_alone  # noqa: F401 (fixtures)

PROMPTS = [{"prompt": "the cat sat", "adapter": "ours", "rank": 3},
           {"prompt": "a longer prompt than the first one", "adapter": "peft_rs"},
           {"prompt": "no adapter here", "adapter": None},
           {"prompt": "x", "adapter": "ours", "rank": None},
           {"prompt": "the fixed rule", "adapter": "fixed", "rank": 5}]


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return path


def run(tmp_path, adapter_paths, prompts, *extra):
    args = ["generate", "--model", str(EMBEDDED_MODEL_DIR), "--prompts", str(write_prompts(tmp_path / "p.jsonl",
            prompts)), "--out", str(tmp_path / "out.jsonl"), "--backend", "torch", "--max-new-tokens", "5",
            "--batch-size", "2", *extra]
    for name, path in adapter_paths.items():
        args += ["--adapter", f"{name}={path}"]
    return main(args)


def test_generate_writes_one_completion_per_prompt_with_its_adapter_rank_and_rate(tmp_path, adapter_paths, base):
    assert run(tmp_path, adapter_paths, PROMPTS) == 0
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(line["prompt"], line["adapter"], line["rank"]) for line in lines] == [
        ("the cat sat", "ours", 3), ("a longer prompt than the first one", "peft_rs", 7),
        ("no adapter here", None, None), ("x", "ours", 8), ("the fixed rule", "fixed", 5)]
    for line in lines:
        assert 0 <= line["new_tokens"] <= 5 and line["seconds"] > 0
        assert line["tokens_per_s"] == pytest.approx(line["new_tokens"] / line["seconds"], rel=1e-2, abs=1e-3)
    # a request in a left-padded batch completes as it does alone on its merged model
    tokenizer = load_tokenizer(str(EMBEDDED_MODEL_DIR))
    ids = tokenizer(PROMPTS[1]["prompt"], return_tensors="pt")["input_ids"]
    alone = merged_alone(base, adapter_paths["peft_rs"], None).float().generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
        pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in alone:
        alone = alone[:alone.index(tokenizer.eos_token_id)]
    assert lines[1]["completion"] == tokenizer.decode(alone, skip_special_tokens=True)
    assert lines[1]["new_tokens"] == len(alone)


@pytest.mark.parametrize("prompts, fragment", [
    ([{"prompt": "a", "adapter": "nope"}], "p.jsonl:1: unknown adapter 'nope'"),
    ([{"prompt": "a"}, {"prompt": "b", "adapter": "ours", "rank": 9}],
     "p.jsonl:2: adapter 'ours': rank 9 is outside [1, 8]"),
    ([{"prompt": "a", "rank": 2}], "p.jsonl:1: rank 2 for a prompt of no adapter"),
    ([{"text": "a"}], "p.jsonl:1:"),
])
def test_a_bad_prompt_line_is_one_line_naming_it_and_writes_nothing(tmp_path, adapter_paths, prompts, fragment,
                                                                    capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, adapter_paths, prompts)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_an_adapter_flag_without_a_path_is_a_usage_error(tmp_path, adapter_paths, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, adapter_paths, PROMPTS, "--adapter", "lonely")
    assert "--adapter 'lonely': expected NAME=PATH" in capsys.readouterr().err
