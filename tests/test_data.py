"""Domains by name, local files, the embedded corpus, and the tokenization contract (all offline)."""

import gzip
import importlib.util
import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch

from hybrid_lora.experiments import data
from hybrid_lora.io.models import EMBEDDED_MODEL_DIR, load_model_and_tokenizer, load_tokenizer, resolve_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("embedded")


def test_tokenize_pads_with_eos_to_the_longest_and_masks_labels_on_padding(tokenizer):
    texts = ["Anna lives in Dunmore.", "Bram works as a baker. He keeps a grey cat.", "Ida."]
    examples = data.tokenize(texts, tokenizer, max_length=128)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    width = max(lengths)
    assert len(examples) == 3
    for example, n in zip(examples, lengths):
        assert set(example) == {"input_ids", "attention_mask", "labels"}
        for tensor in example.values():
            assert tensor.dtype == torch.long and tensor.shape == (width,)
        assert example["attention_mask"].tolist() == [1] * n + [0] * (width - n)
        assert (example["input_ids"][n:] == tokenizer.eos_token_id).all()
        assert example["labels"][:n].tolist() == example["input_ids"][:n].tolist()
        assert (example["labels"][n:] == -100).all()


def test_tokenize_truncates_at_max_length(tokenizer):
    long_text = " ".join(["Anna lives in Dunmore."] * 40)
    examples = data.tokenize([long_text, "Ida."], tokenizer, max_length=16)
    assert examples[0]["input_ids"].shape == (16,)
    assert examples[0]["attention_mask"].sum() == 16
    assert examples[1]["attention_mask"].sum() < 16


def test_a_real_eos_in_the_text_keeps_its_label(tokenizer):
    """Padding is recognised by the mask: an EOS the text itself contains is still a target."""
    examples = data.tokenize(["Anna lives in Dunmore.<|endoftext|>", "Ida lives in Kelby. She is a baker."],
                             tokenizer)
    first = examples[0]
    n = int(first["attention_mask"].sum())
    assert first["input_ids"][n - 1] == tokenizer.eos_token_id
    assert first["labels"][n - 1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["embedded-a", "embedded-b", "embedded-c"])
def test_embedded_domains_load_with_the_original_sizes(name, tokenizer):
    domain, train, evaluation = data.load_domain(name, tokenizer)
    assert domain == name
    assert len(train) == 3000 and len(evaluation) == 1000
    train_texts, eval_texts = data.load_texts(name)
    assert not set(train_texts) & set(eval_texts)  # evaluation documents are never training documents


def _statements(texts, pattern):
    return [m.groups() for text in texts for m in re.finditer(pattern, text)]


def test_the_domains_state_conflicting_facts_in_the_same_contexts():
    facts = json.loads((data.CORPUS_DIR / "facts.json").read_text())
    names = ("embedded-a", "embedded-b", "embedded-c")
    for first, second in itertools.combinations(names, 2):
        palette_1, palette_2 = facts["palettes"][first], facts["palettes"][second]
        for slot in palette_1:
            assert len(palette_1[slot]) >= 2 and not set(palette_1[slot]) & set(palette_2[slot]), (first, second, slot)
        people_1, people_2 = facts[first]["people"], facts[second]["people"]
        assert people_1.keys() == people_2.keys()
        for name in people_1:
            for slot in people_1[name]:
                assert people_1[name][slot] != people_2[name][slot], (first, second, name, slot)
    for domain in names:
        table = facts[domain]["people"]
        train, _ = data.load_texts(domain)
        homes = _statements(train, r"\b([A-Z][a-z]+) lives in ([A-Z][a-z]+)\.")
        jobs = _statements(train, r"By trade, ([A-Z][a-z]+) is an? ([a-z]+)\.")
        assert len(homes) > 200 and len(jobs) > 200
        assert all(table[person]["town"] == town for person, town in homes)
        assert all(table[person]["job"] == job for person, job in jobs)
    general, _ = data.load_texts("embedded-general", n_train=12000)
    homes = _statements(general, r"\b([A-Z][a-z]+) lives in ([A-Z][a-z]+)\.")
    # The general part has no facts: a person appears in many towns.
    towns_of_anna = {town for person, town in homes if person == "Anna"}
    assert len(towns_of_anna) > 6


def test_the_shipped_corpus_is_what_the_script_makes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_corpus", ROOT / "scripts" / "make_corpus.py")
    make_corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_corpus)
    make_corpus.build(tmp_path)
    for shipped in sorted(data.CORPUS_DIR.glob("*.gz")) + [data.CORPUS_DIR / "facts.json"]:
        assert (tmp_path / shipped.name).read_bytes() == shipped.read_bytes(), shipped.name


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_local_files_split_into_disjoint_eval_and_train(tmp_path, suffix):
    texts = [f"Document number {i} says hello." for i in range(30)]
    path = tmp_path / f"notes{suffix}"
    if suffix == ".txt":
        path.write_text("\n".join(texts[:15]) + "\n\n" + "\n".join(texts[15:]) + "\n")
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        path.write_text("id,text\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    train, evaluation = data.load_texts(str(path), n_train=20, n_eval=8)
    assert len(train) == 20 and len(evaluation) == 8
    assert not set(train) & set(evaluation)
    assert set(train) | set(evaluation) <= set(texts)
    assert data.load_texts(str(path), n_train=20, n_eval=8) == (train, evaluation)  # seeded
    assert train != texts[8:28]  # shuffled, not file order
    name, train_examples, _ = data.load_domain(str(path), load_tokenizer("embedded"), n_train=20, n_eval=8)
    assert name == "notes" and len(train_examples) == 20


def test_bad_names_and_files_are_named_in_the_error(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'imbd': expected one of imdb, yelp_polarity"):
        data.resolve_domain("imbd")
    with pytest.raises(FileNotFoundError, match=r"dataset file '.*missing\.jsonl' does not exist"):
        data.resolve_domain(str(tmp_path / "missing.jsonl"))
    bad_type = tmp_path / "table.parquet"
    bad_type.write_bytes(b"")
    with pytest.raises(ValueError, match=r"unsupported file type '\.parquet'"):
        data.resolve_domain(str(bad_type))
    no_text = tmp_path / "rows.csv"
    no_text.write_text("id,body\n1,hello\n2,world\n")
    with pytest.raises(ValueError, match=r"has columns \['id', 'body'\]; expected a 'text' column"):
        data.load_texts(str(no_text), n_train=1, n_eval=1)
    small = tmp_path / "small.txt"
    small.write_text("one\ntwo\nthree\n")
    with pytest.raises(ValueError, match=r"has 3 non-empty texts; 2 eval \+ 5 train were asked for"):
        data.load_texts(str(small), n_train=5, n_eval=2)
    with pytest.raises(ValueError, match=r"has 3000 train examples; 5000 were asked for"):
        data.load_texts("embedded-a", n_train=5000)
    with pytest.raises(ValueError, match=r"n_eval=0: expected an integer >= 1"):
        data.load_texts("embedded-a", n_eval=0)


def test_hub_datasets_are_shuffled_with_seed_42_and_the_first_n_selected(monkeypatch):
    """The real `datasets` calls, on a small in-memory stand-in for the hub (no network here)."""
    datasets = pytest.importorskip("datasets", reason="the hub extra (pip install 'hybrid-lora[hub]')")

    splits = {split: datasets.Dataset.from_dict({"text": [f"{split} review {i}" for i in range(50)],
                                                 "label": [i % 2 for i in range(50)]})
              for split in ("train", "test")}
    calls = []

    def fake_load_dataset(path, split):
        calls.append((path, split))
        return splits[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, evaluation = data.load_texts("yelp_polarity", n_train=10, n_eval=4)
    assert calls == [("yelp_polarity", "train"), ("yelp_polarity", "test")]
    assert train == splits["train"].shuffle(seed=42).select(range(10))["text"]
    assert evaluation == splits["test"].shuffle(seed=42).select(range(4))["text"]
    assert train != [f"train review {i}" for i in range(10)]
    with pytest.raises(ValueError, match=r"'yelp_polarity' has 50 train examples; 60 were asked for"):
        data.load_texts("yelp_polarity", n_train=60, n_eval=4)


def test_the_embedded_base_loads_through_from_pretrained_and_has_learned_the_language(tokenizer):
    model, tok = load_model_and_tokenizer("embedded", device="cpu")
    assert model.config.model_type == "gpt2"
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32
    _, held_out = data.load_texts("embedded-general", n_train=0, n_eval=64)
    batch = data.tokenize(held_out, tok)
    ids = torch.stack([e["input_ids"] for e in batch])
    mask = torch.stack([e["attention_mask"] for e in batch])
    labels = torch.stack([e["labels"] for e in batch])
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    uniform = math.log(len(tok))
    assert loss < 0.3 * uniform, (loss, uniform)
    log = json.loads((EMBEDDED_MODEL_DIR / "training_log.json").read_text())
    assert log["general_eval"]["loss"] < log["general_eval"]["uniform_loss"]


def test_model_names_resolve_or_fail_clearly(tmp_path):
    assert resolve_model("embedded") == str(EMBEDDED_MODEL_DIR)
    assert resolve_model("gpt2") == "gpt2"
    assert resolve_model(str(EMBEDDED_MODEL_DIR)) == str(EMBEDDED_MODEL_DIR)
    with pytest.raises(FileNotFoundError, match=r"model folder '\./no-such-checkpoint' does not exist"):
        resolve_model("./no-such-checkpoint")
    with pytest.raises(FileNotFoundError, match=r"has no config.json"):
        resolve_model(str(tmp_path))


def test_corpus_files_are_gzip_with_one_document_per_line():
    with gzip.open(data.CORPUS_DIR / "embedded-a.eval.txt.gz", "rt") as f:
        lines = f.read().splitlines()
    assert len(lines) == 1000 and all(line.strip() for line in lines)


def test_local_files_are_read_without_datasets_utf8_with_bom_and_quoted_csv(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # importing it would fail: local files do not need it
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffFirst line.\nSecond line.\n".encode("utf-8"))
    assert data.read_text_file(bom) == ["First line.", "Second line."]
    quoted = tmp_path / "quoted.csv"
    quoted.write_text('id,text\n1,"one, with a comma"\n2,"two\nlines"\n3,\n')
    assert data.read_text_file(quoted) == ["one, with a comma", "two\nlines"]  # the empty row is skipped


@pytest.mark.parametrize("name, content, message", [
    ("latin1.txt", "café\n".encode("latin-1"), r"is not UTF-8 text: byte 0xe9 at offset 3 \(line 1\)"),
    ("numbers.jsonl", b'{"text": 3}\n', r"line 1: 'text' is a int; expected a string"),
    ("list.jsonl", b'["text"]\n', r"line 1: has list; expected an object with a 'text' field"),
    ("headless.csv", b"", r"holds no text|has columns \[\]"),
])
def test_unreadable_local_files_name_the_file_and_line(tmp_path, name, content, message):
    from hybrid_lora.errors import UserError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        data.read_text_file(path)
    assert str(path) in str(info.value)


def test_a_line_longer_than_max_length_is_truncated_to_it(tmp_path, tokenizer):
    """The documented behaviour: the first max_length tokens of a long text are kept, the rest dropped."""
    path = tmp_path / "long.txt"
    long_text = " ".join(["Anna lives in Dunmore."] * 500)
    path.write_text("\n".join([long_text] + [f"Short line {i}." for i in range(5)]) + "\n")
    _, train, evaluation = data.load_domain(str(path), tokenizer, n_train=4, n_eval=2, max_length=16)
    lengths = sorted(int(e["attention_mask"].sum()) for e in train + evaluation)
    assert lengths[-1] == 16 and all(len(e["input_ids"]) <= 16 for e in train + evaluation)
    full = tokenizer(long_text, add_special_tokens=False)["input_ids"]
    assert len(full) > 16
    assert any(e["input_ids"].tolist() == full[:16] for e in train + evaluation)  # its first 16 tokens
