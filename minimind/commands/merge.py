"""`minimind merge`: fold a LoRA adapter into its base model, for a plain model that runs at full speed.

    minimind merge --model output/final --adapter output/lora/adapter --output_dir output/merged
"""
from pathlib import Path

from . import inputs
from .flags import Parser, add_boolean

HELP = "merge a LoRA adapter into its base model"


def parser(prog="minimind merge"):
    parser = Parser(prog=prog, description="Fold a LoRA adapter into its base model.")
    parser.add_argument("--model", "--base", required=True,
                        help="the base model: a HF-style directory or a .pth (--base is the same flag)")
    parser.add_argument("--adapter", required=True,
                        help="the adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--output_dir", "--out", required=True,
                        help="where to write the merged HF-style directory (--out is the same flag)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer to save with it [the base's, else the bundled one]")
    add_boolean(parser, "--save_pth", help="also write model.pth, the original MiniMind's format (the directory's "
                                           "model.safetensors already loads everywhere: --model, transformers)")
    return parser


def check(args):
    inputs.must_exist("--model", args.model)
    inputs.adapter("--adapter", args.adapter)
    inputs.tokenizer("--tokenizer", args.tokenizer)


def run(args):
    # torch, peft and the model code load here, after the flags were checked (--help stays instant)
    from ..data.tokenizer import load_tokenizer
    from ..model.checkpoint import load_model, save_model_directory, save_state_dict
    from ..model.lora import apply_adapter

    base_path = Path(args.model)
    model = apply_adapter(load_model(base_path), args.adapter)
    out = Path(args.output_dir)
    tokenizer_dir = args.tokenizer or (base_path if (base_path / "tokenizer.json").exists() else None)
    save_model_directory(model, load_tokenizer(tokenizer_dir), out)
    if args.save_pth:
        save_state_dict(model, out / "model.pth")
    print(f"Merged {args.adapter} into {args.model}: {out}")
    return 0
