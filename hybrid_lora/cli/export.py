"""``hybrid-lora export``: an adapter at a rank in peft's format and/or as merged weights."""

from hybrid_lora.cli.evaluate import load_adapter_model
from hybrid_lora.cli.options import check_model, check_rank, parse_device


def run_export(parser, args):
    from hybrid_lora.io.export import check_mergeable, export_merged, export_peft

    if not args.peft and not args.merged:
        parser.error("export: give --peft DIR, --merged DIR or both")
    model, tokenizer, metadata, model_name = load_adapter_model(parser, args)
    rank = args.rank if args.rank is not None else metadata["rank"]
    check_rank(parser, "--rank", rank, metadata["r_max"])
    model.to(parse_device(parser, args.device))
    if args.merged:
        try:
            check_mergeable(model)  # before anything is written
        except ValueError as err:
            parser.error(f"--merged: {err}")
    if args.peft:
        export_peft(model, args.peft, rank, base_model_name_or_path=check_model(parser, model_name))
        print(f"peft adapter at rank {rank}: {args.peft}")
    if args.merged:
        export_merged(model, tokenizer, args.merged, rank)
        print(f"merged checkpoint at rank {rank}: {args.merged}")
    return 0
