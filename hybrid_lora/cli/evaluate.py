"""``hybrid-lora eval``: a saved adapter at a rank, or over a sweep of ranks, on any domains."""


from hybrid_lora.cli.options import (check_backend, check_domains, check_model, check_quantization, check_rank,
                                     chosen_backend, parse_device)
from hybrid_lora.io.atomic import write_json


def load_adapter_model(parser, args):
    from hybrid_lora.io.adapter_files import attach_adapter, read_adapter
    from hybrid_lora.io.models import load_model_and_tokenizer

    _, metadata = read_adapter(args.adapter)
    model_name = args.model or metadata["base_model"]
    check_model(parser, model_name)
    model, tokenizer = load_model_and_tokenizer(model_name, device="cpu" if not getattr(args, "load_in_4bit", False) else args.device,
                                                quantization=_quantization(args))
    attach_adapter(model, args.adapter, dropout=0.0)
    return model, tokenizer, metadata, model_name


def _quantization(args):
    """The 4-bit loading of --load-in-4bit (decoded to fp32), or None (and for export, which has no such flag)."""
    if not getattr(args, "load_in_4bit", False):
        return None
    from hybrid_lora.io.quantization import Quantization

    return Quantization(args.bnb_4bit_quant_type, args.bnb_4bit_double_quant)


def run_eval(parser, args):
    from torch.utils.data import DataLoader

    from hybrid_lora.experiments.data import load_domain
    from hybrid_lora.nn.layer import set_rank
    from hybrid_lora.train.metrics import evaluate

    device = parse_device(parser, args.device)
    check_domains(parser, args.domains)
    check_backend(parser, args.backend, device)
    check_quantization(parser, args)
    model, tokenizer, metadata, _ = load_adapter_model(parser, args)
    r_max = metadata["r_max"]
    if args.sweep is not None:
        ranks = args.sweep or sorted({1 << k for k in range(r_max.bit_length())} | {r_max})
        flag = "--sweep"
    else:
        ranks = [args.rank if args.rank is not None else metadata["rank"]]
        flag = "--rank"
    for rank in ranks:
        check_rank(parser, flag, rank, r_max)
    model.to(device)
    results = {"adapter": str(args.adapter), "r_max": r_max, "by_domain": {}}
    with chosen_backend(args.backend, device):
        for name in args.domains:
            domain_name, _, examples = load_domain(name, tokenizer, 0, args.eval_examples, args.max_length)
            loader = DataLoader(examples, batch_size=args.batch_size, shuffle=False)
            by_rank = {}
            for rank in ranks:
                set_rank(model, rank)
                by_rank[rank] = evaluate(model, loader, device)
                print(f"{domain_name:>16}  rank {rank:3d}  loss {by_rank[rank]['loss']:.4f}  "
                      f"accuracy {by_rank[rank]['accuracy']:.4f}")
            results["by_domain"][domain_name] = by_rank
    if args.out:
        write_json(args.out, results)
    return 0
