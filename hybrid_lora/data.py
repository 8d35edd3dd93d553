"""Domains for continual fine-tuning: find them by name, read their texts, tokenize them for a causal LM.

A domain is named by one of
  - ``imdb`` or ``yelp_polarity``: the Hugging Face hub datasets of the original
    experiment, read with ``datasets.load_dataset``; each split is
    ``shuffle(seed=42)`` and its first n examples selected (3000 train, 1000 eval);
  - ``embedded-a``, ``embedded-b`` (and ``embedded-general``): the corpus shipped in
    ``hybrid_lora/assets/corpus`` (see its README; made by ``scripts/make_corpus.py``),
    which needs no network;
  - a path to a local ``.txt`` (one example per non-empty line), ``.jsonl`` or
    ``.csv`` file (a ``text`` column). The file is shuffled with the seed and cut
    into disjoint parts: the first n_eval examples for evaluation, the next
    n_train for training.

Tokenization (the original's): at most ``max_length`` (128) tokens, padded with
EOS, ``labels`` equal to ``input_ids`` with -100 on the padding. Each example is a
dict of LongTensors ``input_ids``, ``attention_mask``, ``labels``, all of shape [T].
All examples of one call share T = min(max_length, longest example), so they stack
into batches; padding beyond that would change no loss or accuracy (the padding is
on the right, masked, and unlabelled) and would only cost time.
"""

import gzip
from dataclasses import dataclass
from pathlib import Path

import torch

HUB_DATASETS = ("imdb", "yelp_polarity")
# domain name -> file stem in CORPUS_DIR
EMBEDDED_DOMAINS = {"embedded-a": "embedded-a", "embedded-b": "embedded-b", "embedded-general": "general"}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv")
CORPUS_DIR = Path(__file__).resolve().parent / "assets" / "corpus"
SHUFFLE_SEED = 42  # the original's shuffle(seed=42) of every split


@dataclass(frozen=True)
class DomainSource:
    """Where a domain's texts come from: kind is 'hub', 'embedded' or 'file'; location is a name or a path."""
    name: str
    kind: str
    location: str


def known_names():
    return HUB_DATASETS + tuple(EMBEDDED_DOMAINS)


def resolve_domain(name):
    """Check a domain name without reading it. Raises ValueError (unknown name) or FileNotFoundError (no such file)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"dataset {name!r}: expected a dataset name or a file path")
    if name in HUB_DATASETS:
        return DomainSource(name, "hub", name)
    if name in EMBEDDED_DOMAINS:
        return DomainSource(name, "embedded", EMBEDDED_DOMAINS[name])
    path = Path(name).expanduser()
    looks_like_path = path.suffix.lower() in LOCAL_SUFFIXES or "/" in name or "\\" in name
    if not looks_like_path:
        raise ValueError(
            f"unknown dataset {name!r}: expected one of {', '.join(known_names())}, "
            f"or a path to a {'/'.join(LOCAL_SUFFIXES)} file"
        )
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise ValueError(f"dataset file {name!r}: unsupported file type {path.suffix!r}; expected one of {LOCAL_SUFFIXES}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {name!r} does not exist")
    return DomainSource(path.stem, "file", str(path))


def _check_counts(n_train, n_eval):
    for what, n, least in (("n_train", n_train, 0), ("n_eval", n_eval, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise ValueError(f"{what}={n!r}: expected an integer >= {least}")


def _too_few(source, split, have, want, flag):
    return ValueError(
        f"dataset {source.location!r} has {have} {split} examples; {want} were asked for (lower {flag})"
    )


def _hub_texts(source, n_train, n_eval):
    import datasets

    texts = {}
    for split, hub_split, n, flag in (("train", "train", n_train, "--train-examples"),
                                      ("eval", "test", n_eval, "--eval-examples")):
        if n == 0:
            texts[split] = []
            continue
        ds = datasets.load_dataset(source.location, split=hub_split).shuffle(seed=SHUFFLE_SEED)
        if len(ds) < n:
            raise _too_few(source, split, len(ds), n, flag)
        texts[split] = list(ds.select(range(n))["text"])
    return texts["train"], texts["eval"]


def _read_gz_lines(path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _embedded_texts(source, n_train, n_eval):
    """The shipped files are already in a random order, so the first n are a random sample."""
    part = source.location
    train = _read_gz_lines(CORPUS_DIR / f"{part}.train.txt.gz")
    evaluation = _read_gz_lines(CORPUS_DIR / f"{part}.eval.txt.gz")
    if len(train) < n_train:
        raise _too_few(source, "train", len(train), n_train, "--train-examples")
    if len(evaluation) < n_eval:
        raise _too_few(source, "eval", len(evaluation), n_eval, "--eval-examples")
    return train[:n_train], evaluation[:n_eval]


def read_text_file(path):
    """All texts of a local .txt / .jsonl / .csv file, in file order, through ``datasets``' loaders."""
    import datasets

    path = Path(path)
    suffix = path.suffix.lower()
    builder = {".txt": "text", ".jsonl": "json", ".csv": "csv"}[suffix]
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    if "text" not in ds.column_names:
        raise ValueError(f"dataset file {str(path)!r} has columns {ds.column_names}; expected a 'text' column")
    texts = [t for t in ds["text"] if isinstance(t, str) and t.strip()]
    return texts


def _file_texts(source, n_train, n_eval):
    texts = read_text_file(source.location)
    if len(texts) < n_train + n_eval:
        raise ValueError(
            f"dataset file {source.location!r} has {len(texts)} non-empty texts; {n_eval} eval + {n_train} train "
            "were asked for (lower --eval-examples / --train-examples)"
        )
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(SHUFFLE_SEED)).tolist()
    shuffled = [texts[i] for i in order]
    return shuffled[n_eval:n_eval + n_train], shuffled[:n_eval]


def load_texts(name, n_train=3000, n_eval=1000):
    """(train_texts, eval_texts) of the domain `name` (see the module docstring)."""
    _check_counts(n_train, n_eval)
    source = resolve_domain(name)
    reader = {"hub": _hub_texts, "embedded": _embedded_texts, "file": _file_texts}[source.kind]
    return reader(source, n_train, n_eval)


def tokenize(texts, tokenizer, max_length=128):
    """Causal-LM examples: list of dicts of LongTensors input_ids / attention_mask / labels, each [T].

    Texts are truncated to `max_length` tokens and right-padded with EOS to the
    longest of them; labels are the input ids with -100 where attention_mask is 0
    (EOS is the pad, so padding is recognised by the mask, not by the token id).
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r}: expected an integer >= 2")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token to pad with")
    if not texts:
        raise ValueError("tokenize: no texts")
    ids = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    lengths = [len(x) for x in ids]
    if min(lengths) == 0:
        raise ValueError(f"tokenize: text {lengths.index(0)} has no tokens")
    width = max(lengths)
    input_ids = torch.full((len(ids), width), tokenizer.eos_token_id, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, :len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return [{"input_ids": input_ids[i], "attention_mask": attention_mask[i], "labels": labels[i]}
            for i in range(len(ids))]


def load_domain(name, tokenizer, n_train=3000, n_eval=1000, max_length=128):
    """(name, train_examples, eval_examples): the triple `run_continual` takes for one domain.

    n_train = 0 reads no training texts (for evaluation only) and gives an empty list.
    """
    train_texts, eval_texts = load_texts(name, n_train, n_eval)
    source = resolve_domain(name)
    train = tokenize(train_texts, tokenizer, max_length) if train_texts else []
    return source.name, train, tokenize(eval_texts, tokenizer, max_length)
