"""Replay: each stage trains on its own domain plus a small sample of the earlier domains' training examples.

A reference point, not the method: it breaks the rule the method keeps, that
no data of an earlier domain is stored. Experience replay (e.g. Rolnick et
al., NeurIPS 2019) with a fraction of 1-5 % of each earlier domain is the
usual cheap upper reference for how much keeping old data helps.
"""

import hashlib

import torch


def replay_sample(size, fraction, seed, domain_index):
    """Indices of round(fraction * size) examples (at least one when fraction > 0) of an earlier domain: a pure
    function of (seed, domain_index), the same at every later stage."""
    count = max(1, round(fraction * size)) if fraction > 0 else 0
    key = hashlib.sha256(f"replay/{seed}/{domain_index}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
    return torch.randperm(size, generator=generator)[:count].tolist()


def with_replay(domains, fraction, seed):
    """The domains with each stage's training set extended by ``replay_sample`` of every earlier domain.

    domains: (name, train, eval) triples; evaluation sets are untouched. fraction: in [0, 1).
    Tokenized domains are padded each to its own longest example (``data``), so the examples of a stage
    that mixes domains are right-padded to the longest of them (``padded``), to stack into batches.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"replay fraction {fraction!r}; expected a fraction in [0, 1)")
    kept = [[d[1][i] for i in replay_sample(len(d[1]), fraction, seed, index)] for index, d in enumerate(domains)]
    out = []
    for t, (name, train, evaluation) in enumerate(domains):
        extra = [example for earlier in kept[:t] for example in earlier]
        examples = list(train) + extra
        if extra and all("input_ids" in example for example in examples):
            length = max(example["input_ids"].shape[0] for example in examples)
            examples = [padded(example, length) for example in examples]
        out.append((name, examples, evaluation))
    return out


def padded(example, length):
    """A tokenized example (input_ids, attention_mask, labels [T]) right-padded to `length` >= T.

    The added positions are masked and unlabelled, so in a causal LM they change no loss and no accuracy
    of the example: no real token attends to a later position. The ids put there are never read.
    """
    extra = length - example["input_ids"].shape[0]
    if extra < 0:
        raise ValueError(f"example of {example['input_ids'].shape[0]} tokens; expected at most {length}")
    if extra == 0:
        return example

    def pad(tensor, value):
        return torch.cat([tensor, tensor.new_full((extra,), value)])

    return {**example, "input_ids": pad(example["input_ids"], int(example["input_ids"][-1])),
            "attention_mask": pad(example["attention_mask"], 0), "labels": pad(example["labels"], -100)}
