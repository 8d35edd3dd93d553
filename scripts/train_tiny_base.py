"""Train the tiny GPT-2 base shipped in ``hybrid_lora/assets/tiny-gpt2/`` (CPU, a few minutes).

1. A byte-level BPE tokenizer (GPT-2's kind: same pre-tokenizer, same
   ``<|endoftext|>`` token, loadable by ``GPT2Tokenizer.from_pretrained``) is
   trained with the ``tokenizers`` library on the general part of the embedded
   corpus (``scripts/make_corpus.py``).
2. A 4-layer GPT-2 (``GPT2LMHeadModel``, d_model 128, 4 heads, 128 positions)
   is trained from scratch on the same texts with AdamW and a cosine schedule.
   The general part states no fixed facts, so the base learns the language of
   the corpus and not the facts of either domain; that is what the LoRA
   adapters are then fine-tuned to learn.
3. Both are saved with ``save_pretrained`` (safetensors), so the base loads
   through the same ``from_pretrained`` calls as ``gpt2``, together with
   ``training_log.json``: the held-out loss against the uniform baseline
   ln(vocab size), and the base's loss on each domain before any adaptation.

Usage: nice python scripts/train_tiny_base.py [--out hybrid_lora/assets/tiny-gpt2] [--steps 800]
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hybrid_lora.experiments.data import load_texts, tokenize

EOS = "<|endoftext|>"


def train_tokenizer(texts, vocab_size, out_dir):
    """Byte-level BPE on `texts`, saved as vocab.json + merges.txt + tokenizer.json in `out_dir`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Tokenizer

    bpe = ByteLevelBPETokenizer()  # GPT-2's byte-level pre-tokenizer, no prefix space
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        tokenizer = GPT2Tokenizer.from_pretrained(tmp)
        tokenizer.save_pretrained(out_dir)
        # The two plain files as well, as in the gpt2 checkpoint, for tokenizer classes that read them.
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(os.path.join(tmp, name), out_dir / name)
    return GPT2Tokenizer.from_pretrained(out_dir)


def batches(examples, batch_size, generator):
    order = torch.randperm(len(examples), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):
        rows = [examples[i] for i in order[start:start + batch_size]]
        yield {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@torch.no_grad()
def evaluate(model, examples, batch_size=64):
    """(mean cross-entropy over labelled target tokens, next-token accuracy on the same tokens)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, len(examples), batch_size):
        rows = examples[start:start + batch_size]
        batch = {key: torch.stack([row[key] for row in rows]) for key in rows[0]}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        targets = batch["labels"][:, 1:]  # (B, T-1)
        logits = logits[:, :-1]
        mask = targets != -100
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask], reduction="sum")
        total_loss += loss.item()
        correct += (logits.argmax(-1)[mask] == targets[mask]).sum().item()
        count += mask.sum().item()
    model.train()
    return total_loss / count, correct / count


def lr_at(step, steps, peak, warmup):
    """Linear warmup, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parents[1]
    parser.add_argument("--out", default=str(root / "hybrid_lora" / "assets" / "tiny-gpt2"))
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    staging = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    train_texts, eval_texts = load_texts("embedded-general", n_train=12000, n_eval=1000)
    tokenizer = train_tokenizer(train_texts, args.vocab_size, staging)
    train = tokenize(train_texts, tokenizer, max_length=128)
    held_out = tokenize(eval_texts, tokenizer, max_length=128)
    print(f"tokenizer: {len(tokenizer)} tokens; train {len(train)} x {train[0]['input_ids'].numel()} tokens")

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    step, start = 0, time.time()
    model.train()
    while step < args.steps:
        for batch in batches(train, args.batch_size, generator):
            if step >= args.steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % 50 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
            step += 1

    eval_loss, eval_acc = evaluate(model, held_out)
    log = {
        "config": {k: getattr(config, k) for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")},
        "parameters": n_params,
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
                  "examples": len(train), "seconds": round(time.time() - start, 1)},
        "general_eval": {"loss": eval_loss, "accuracy": eval_acc,
                         "uniform_loss": math.log(len(tokenizer)), "perplexity": math.exp(eval_loss)},
    }
    for domain in ("embedded-a", "embedded-b"):
        _, domain_eval = load_texts(domain, n_train=1, n_eval=1000)
        loss, acc = evaluate(model, tokenize(domain_eval, tokenizer, max_length=128))
        log[f"{domain}_eval_before_adaptation"] = {"loss": loss, "accuracy": acc}
    print(json.dumps(log, indent=1))

    model.save_pretrained(staging, safe_serialization=True)
    (staging / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(staging, out_dir)


if __name__ == "__main__":
    main()
