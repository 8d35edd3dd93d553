"""Domains for continual fine-tuning: find them by name, read their texts, tokenize them for a causal LM.

A domain is named by one of
  - ``imdb`` or ``yelp_polarity``: the Hugging Face hub datasets of the original
    experiment, read with ``datasets.load_dataset``; each split is
    ``shuffle(seed=42)`` and its first n examples selected (3000 train, 1000 eval);
  - ``embedded-a``, ``embedded-b``, ``embedded-c`` (and ``embedded-general``): the corpus shipped in
    ``hybrid_lora/assets/corpus`` (see its README; made by ``scripts/make_corpus.py``),
    which needs no network;
  - a path to a local ``.txt`` (one example per non-empty line), ``.jsonl`` (one
    JSON object per line with a string ``text``) or ``.csv`` (a header row with a
    ``text`` column) file, UTF-8 (a BOM is allowed). The file is shuffled with the
    seed and cut into disjoint parts: the first n_eval examples for evaluation,
    the next n_train for training. Blank texts are skipped; a file that is not
    UTF-8, holds no text, lacks the ``text`` column or field, or has a line that
    does not parse is refused with an error naming the file and the line.

Every problem with the data the user named (an unknown name, a missing or
unreadable file, fewer examples than asked for, the hub unreachable) raises a
``errors.UserError`` whose message names the data set or file.

Tokenization (the original's): at most ``max_length`` (128) tokens, padded with
EOS, ``labels`` equal to ``input_ids`` with -100 on the padding. Each example is a
dict of LongTensors ``input_ids``, ``attention_mask``, ``labels``, all of shape [T].
All examples of one call share T = min(max_length, longest example), so they stack
into batches; padding beyond that would change no loss or accuracy (the padding is
on the right, masked, and unlabelled) and would only cost time. A text longer
than ``max_length`` tokens is truncated to its first ``max_length`` tokens (the
original's ``truncation=True``); the rest of it is not trained on.
"""

import csv
import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hybrid_lora.errors import BadValue, MissingFile, Unavailable

HUB_DATASETS = ("imdb", "yelp_polarity")
# domain name -> file stem in CORPUS_DIR
EMBEDDED_DOMAINS = {"embedded-a": "embedded-a", "embedded-b": "embedded-b", "embedded-c": "embedded-c",
                    "embedded-general": "general"}
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv")
CORPUS_DIR = Path(__file__).resolve().parents[1] / "assets" / "corpus"
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
    """Check a domain name without reading it. Raises BadValue (unknown name) or MissingFile (no such file)."""
    if not isinstance(name, str) or not name.strip():
        raise BadValue(f"dataset {name!r}: expected a dataset name or a file path")
    if name in HUB_DATASETS:
        return DomainSource(name, "hub", name)
    if name in EMBEDDED_DOMAINS:
        return DomainSource(name, "embedded", EMBEDDED_DOMAINS[name])
    path = Path(name).expanduser()
    looks_like_path = path.suffix.lower() in LOCAL_SUFFIXES or "/" in name or "\\" in name
    if not looks_like_path:
        raise BadValue(
            f"unknown dataset {name!r}: expected one of {', '.join(known_names())}, "
            f"or a path to a {'/'.join(LOCAL_SUFFIXES)} file"
        )
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise BadValue(f"dataset file {name!r}: unsupported file type {path.suffix!r}; expected one of {LOCAL_SUFFIXES}")
    if not path.is_file():
        raise MissingFile(f"dataset file {name!r} does not exist")
    return DomainSource(path.stem, "file", str(path))


def _check_counts(n_train, n_eval):
    for what, n, least in (("n_train", n_train, 0), ("n_eval", n_eval, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise BadValue(f"{what}={n!r}: expected an integer >= {least}")


def _too_few(source, split, have, want, flag):
    return BadValue(
        f"dataset {source.location!r} has {have} {split} examples; {want} were asked for (lower {flag})"
    )


def _load_hub_split(name, split):
    """datasets.load_dataset(name, split=split), with a missing package or an unreachable hub as Unavailable."""
    try:
        import datasets
    except ImportError:
        raise Unavailable(f"dataset {name!r} is read with the 'datasets' package, which is not installed; "
                          "pip install \"hybrid-lora[hub]\" (or pip install datasets), or give a local "
                          ".txt/.jsonl/.csv file") from None
    try:
        return datasets.load_dataset(name, split=split)
    except OSError as err:  # ConnectionError and the hub's not-found errors are OSErrors
        reason = " ".join(str(err).split())[:200]
        raise Unavailable(f"dataset {name!r} could not be downloaded or found in the cache ({reason}); "
                          "download it once with network access (it is then read from the cache with "
                          "HF_DATASETS_OFFLINE=1), or give a local .txt/.jsonl/.csv file instead") from None


def _hub_texts(source, n_train, n_eval):
    texts = {}
    for split, hub_split, n, flag in (("train", "train", n_train, "--train-examples"),
                                      ("eval", "test", n_eval, "--eval-examples")):
        if n == 0:
            texts[split] = []
            continue
        ds = _load_hub_split(source.location, hub_split).shuffle(seed=SHUFFLE_SEED)
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


def _decode(path, data):
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise BadValue(f"dataset file {str(path)!r} is not UTF-8 text: byte 0x{data[err.start]:02x} at offset "
                       f"{err.start} (line {line}); expected a UTF-8 encoded file") from None


def _jsonl_texts(path, text):
    texts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise BadValue(f"dataset file {str(path)!r}, line {number}: not JSON ({err.msg}); expected one JSON "
                           "object per line") from None
        if not isinstance(row, dict) or "text" not in row:
            keys = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise BadValue(f"dataset file {str(path)!r}, line {number}: has {keys}; expected an object with a "
                           "'text' field")
        if not isinstance(row["text"], str):
            raise BadValue(f"dataset file {str(path)!r}, line {number}: 'text' is a {type(row['text']).__name__}; "
                           "expected a string")
        texts.append(row["text"])
    return texts


def _csv_texts(path, text):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if reader.fieldnames is None or "text" not in reader.fieldnames:
            raise BadValue(f"dataset file {str(path)!r} has columns {reader.fieldnames or []}; expected a 'text' "
                           "column in its header row")
        return [row["text"] or "" for row in reader]
    except csv.Error as err:
        raise BadValue(f"dataset file {str(path)!r}, line {reader.line_num}: not CSV ({err})") from None


def read_text_file(path):
    """All non-blank texts of a local .txt / .jsonl / .csv file, in file order (see the module docstring).

    Read with the standard library, so local files need neither ``datasets`` nor a network.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MissingFile(f"dataset file {str(path)!r} does not exist") from None
    except IsADirectoryError:
        raise BadValue(f"dataset file {str(path)!r} is a folder; expected a .txt, .jsonl or .csv file") from None
    text = _decode(path, data)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        texts = _jsonl_texts(path, text)
    elif suffix == ".csv":
        texts = _csv_texts(path, text)
    else:
        texts = text.splitlines()
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise BadValue(f"dataset file {str(path)!r} holds no text ({len(data)} bytes); expected one example per "
                       f"{'row' if suffix != '.txt' else 'line'}")
    return texts


def _file_texts(source, n_train, n_eval):
    texts = read_text_file(source.location)
    if len(texts) < n_train + n_eval:
        raise BadValue(
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
    texts = list(texts)
    if not texts:
        raise ValueError("tokenize: no texts")
    ids = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)["input_ids"]
    lengths = [len(x) for x in ids]
    if min(lengths) == 0:
        raise BadValue(f"tokenize: text {lengths.index(0)} ({texts[lengths.index(0)][:40]!r}) has no tokens")
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
