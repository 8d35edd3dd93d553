"""``hybrid-lora generate``: completions of many prompts, each at the adapter and rank its line asks for.

    hybrid-lora generate --model gpt2 --adapter support=runs/x/seed-42/adapters/stage2-embedded-b.safetensors \\
        --adapter legal=exported/peft --prompts prompts.jsonl --out completions.jsonl

Each line of the prompts file is a JSON object: ``{"prompt": "...", "adapter":
"support", "rank": 8}`` (``adapter`` null or absent: the base model; ``rank``
null or absent: the adapter's full width). Prompts run in batches of
``--batch-size`` through one ``AdapterBank`` route each, left-padded, greedy
unless ``--sample``. Each line of the output (written whole, at the end) holds
the prompt, its adapter and the rank it ran at, the completion, its new tokens
and their rate (the row's new tokens over its batch's wall time).
"""

import json
import time

from hybrid_lora.cli.options import add_runtime, check_backend, chosen_backend, check_model, parse_device, positive_int
from hybrid_lora.errors import BadValue, MissingFile


def add_parser(commands):
    """The ``generate`` subcommand and its flags."""
    generate = commands.add_parser("generate", help="complete prompts, each at its own adapter and rank, in batches")
    generate.add_argument("--model", default="embedded", help="base model (default: %(default)s)")
    generate.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH", required=True,
                          help="an adapter to serve: our adapter file or a peft adapter folder (repeat the flag)")
    generate.add_argument("--prompts", required=True, help="JSON lines: {\"prompt\", \"adapter\", \"rank\"}")
    generate.add_argument("--out", required=True, help="JSON lines of completions")
    generate.add_argument("--batch-size", type=positive_int, default=8, help="(default: %(default)s)")
    generate.add_argument("--max-new-tokens", type=positive_int, default=32, help="(default: %(default)s)")
    generate.add_argument("--sample", action="store_true", help="sample (temperature, top-k) instead of greedy")
    generate.add_argument("--temperature", type=float, default=1.0, help="with --sample (default: %(default)s)")
    generate.add_argument("--top-k", type=int, default=0, help="with --sample; 0: none (default: %(default)s)")
    generate.add_argument("--seed", type=int, default=0, help="torch seed before each batch (default: %(default)s)")
    add_runtime(generate)
    return generate


def _adapters(parser, specs):
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            parser.error(f"--adapter {spec!r}: expected NAME=PATH")
        if name in adapters:
            parser.error(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def read_prompts(path):
    """[(line number, prompt, adapter or None, rank or None)] of a prompts file, each line checked."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise MissingFile(f"prompts file {str(path)!r} does not exist") from None
    requests = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadValue(f"{path}:{number}: not JSON ({err}); expected "
                           '{"prompt": ..., "adapter": ..., "rank": ...}') from None
        if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"]:
            raise BadValue(f"{path}:{number}: {line[:80]!r}; expected an object with a non-empty \"prompt\"")
        adapter, rank = item.get("adapter"), item.get("rank")
        if adapter is not None and not isinstance(adapter, str):
            raise BadValue(f"{path}:{number}: adapter {adapter!r}; expected a name given with --adapter, or null")
        requests.append((number, item["prompt"], adapter, rank))
    if not requests:
        raise BadValue(f"prompts file {str(path)!r} holds no prompt")
    return requests


def _check_request(where, adapter, rank, sources):
    from hybrid_lora.nn.layer import check_rank

    if adapter is None:
        if rank is not None:
            raise BadValue(f"{where}: rank {rank!r} for a prompt of no adapter; expected null")
        return
    if adapter not in sources:
        raise BadValue(f"{where}: unknown adapter {adapter!r}; expected one of --adapter's names {sorted(sources)}")
    if rank is not None:
        try:
            check_rank(rank, sources[adapter].width, f"{where}: adapter {adapter!r}")
        except ValueError as err:
            raise BadValue(str(err)) from None


def run_generate(parser, args):
    import torch

    from hybrid_lora.io.atomic import write_text
    from hybrid_lora.io.models import load_model_and_tokenizer
    from hybrid_lora.serve import AdapterBank
    from hybrid_lora.serve.adapter_sources import read_adapter_source

    device = parse_device(parser, args.device)
    check_backend(parser, args.backend, device)
    check_model(parser, args.model)
    paths = _adapters(parser, args.adapter)
    requests = read_prompts(args.prompts)
    sources = {name: read_adapter_source(path) for name, path in paths.items()}
    for number, _, adapter, rank in requests:  # every line checked before the model loads
        _check_request(f"{args.prompts}:{number}", adapter, rank, sources)
    first = next(iter(sources.values()))
    model, tokenizer = load_model_and_tokenizer(args.model, device=device)
    model.eval()
    bank = AdapterBank(model, target_modules=sorted(first.tensors), r_max=max(s.width for s in sources.values()),
                       slots=len(sources))
    for name, path in paths.items():
        bank.load(name, path)
    tokenizer.padding_side = "left"
    settings = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, pad_token_id=tokenizer.pad_token_id)
    if args.sample:
        settings.update(temperature=args.temperature, top_k=args.top_k)
    lines = []
    with chosen_backend(args.backend, device), torch.no_grad():
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start:start + args.batch_size]
            encoded = tokenizer([prompt for _, prompt, _, _ in batch], return_tensors="pt", padding=True).to(device)
            adapters = [adapter for _, _, adapter, _ in batch]
            ranks = [None if adapter is None else bank.request_rank(adapter, rank) for _, _, adapter, rank in batch]
            torch.manual_seed(args.seed)
            began = time.perf_counter()
            with bank.route(adapters=adapters, ranks=ranks):
                out = model.generate(**encoded, **settings)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - began
            for row, (_, prompt, adapter, _) in enumerate(batch):
                new = out[row, encoded["input_ids"].shape[1]:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[:new.index(tokenizer.eos_token_id)]
                lines.append(json.dumps({
                    "prompt": prompt, "adapter": adapter, "rank": ranks[row],
                    "completion": tokenizer.decode(new, skip_special_tokens=True), "new_tokens": len(new),
                    "seconds": round(seconds, 6), "tokens_per_s": round(len(new) / seconds, 3),
                }))
            print(f"batch {start // args.batch_size + 1}: {len(batch)} prompts in {seconds:.2f} s")
    write_text(args.out, "\n".join(lines) + "\n")
    print(f"{len(lines)} completions: {args.out}")
    return 0
