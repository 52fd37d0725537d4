"""`minimind export`: a trained model in the formats other tools run (docs/export.md).

    minimind export --model output/final --to llama --output_dir export/llama   # transformers, lm-eval
    minimind export --model output/final --to gguf --output_dir export/gguf     # llama.cpp, Ollama
"""
from ..errors import UserError
from . import inputs
from .flags import Parser
from .inference_flags import add_model_arguments, load_model_from_flags

HELP = "write the model for transformers (Llama layout), llama.cpp or Ollama (GGUF)"
TARGETS = ("llama", "qwen3", "gguf")  # interop.export.TARGETS; here too so that --help needs no torch


def parser(prog="minimind export"):
    parser = Parser(prog=prog, description="Write a trained model in the formats other tools run (docs/export.md).")
    add_model_arguments(parser, dtype_help="precision of the weights written")
    parser.add_argument("--to", required=True, choices=TARGETS,
                        help="llama: a directory transformers opens alone (Llama; Mixtral, GraniteMoeShared or "
                             "Qwen2-MoE for MoE models); qwen3: the same for models with q/k norms; gguf: one file "
                             "for llama.cpp and Ollama")
    parser.add_argument("--output_dir", required=True, help="folder to write (created; same-named files replaced)")
    parser.add_argument("--quantize", choices=["q8_0"], default=None,
                        help="gguf only: 8-bit blocks for the matrices, norms and router stay float32 [none]")
    return parser


def check(args):
    if args.quantize and args.to != "gguf":
        raise UserError(f"--quantize applies to --to gguf only (got --to {args.to})")
    inputs.model_flags(args)


def run(args):
    # torch and the model code load here, after the flags were checked (--help stays instant)
    import torch

    from ..interop.export import export

    # loaded in float32: each writer casts (or quantizes) the weights to what it writes
    model, tokenizer = load_model_from_flags(args, dtype=torch.float32)
    print(export(model, tokenizer, args.to, args.output_dir, args.dtype, args.quantize, args.model))
    return 0
