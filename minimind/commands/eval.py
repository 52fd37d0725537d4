"""`minimind eval`: perplexity, exact match on conversations and GRPO prompts, preferences on DPO
pairs; a table on stdout and a JSON report beside the model (docs/generation.md).

    minimind eval --model output/final --data data/sft_eval.jsonl
"""
import json
import sys
from pathlib import Path

from ..files import atomic_write
from ..interop.model_card import EVAL_REPORT_NAME
from . import inputs
from .flags import Parser, add_boolean, bounded
from .inference_flags import add_decoder_arguments, add_model_arguments, check_backend, load_decoder_from_flags

HELP = "perplexity and exact-match accuracy on a data file"


def parser(prog="minimind eval"):
    parser = Parser(prog=prog, description="Perplexity, exact match on conversations and GRPO prompts, preferences "
                                           "on DPO pairs (docs/generation.md).")
    add_model_arguments(parser)
    add_decoder_arguments(parser)
    parser.add_argument("--data", required=True,
                        help="a pretraining, SFT, preference (DPO) or GRPO prompt data file (.jsonl, .json, .txt, "
                             ".parquet)")
    parser.add_argument("--report", default=None, help="JSON report path [eval_report.json beside the model]")
    parser.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=512, help="evaluation window in tokens")
    parser.add_argument("--batch_size", type=bounded(int, 1, 1 << 16), default=8, help="sequences per forward pass")
    parser.add_argument("--max_samples", type=bounded(int, 1, 1 << 40), default=None,
                        help="evaluate only the first N records [all]")
    add_boolean(parser, "--skip_bad_records", help="skip malformed records (and report them) instead of stopping")
    return parser


def check(args):
    inputs.model_flags(args)
    check_backend(args)
    inputs.data_files("--data", [args.data])


def run(args):
    # torch and the model code load here, after the flags were checked (--help stays instant)
    from ..inference.evaluation import evaluate, format_table

    model, decoder, tokenizer = load_decoder_from_flags(args, time_threads=True)
    report = evaluate(model, tokenizer, args.data, min(args.max_seq_len, model.config.max_position_embeddings),
                      args.batch_size, args.max_samples, args.skip_bad_records, Progress(), decoder)
    report["model"] = args.model
    if "skipped" in report:
        print(report["skipped"], file=sys.stderr)
    report_path = Path(args.report) if args.report else default_report_path(args.model)
    text = json.dumps(report, indent=2, ensure_ascii=False) + "\n"
    atomic_write(report_path, lambda tmp: Path(tmp).write_text(text))  # an interrupted eval keeps the last report
    print(format_table(report))
    print(f"report: {report_path}")
    return 0


class Progress:
    """'answering 120/419': one line rewritten in place on a terminal, a line every 10% in a log file."""

    def __init__(self):
        self.shown_decile = 0

    def __call__(self, done, total):
        if sys.stderr.isatty():
            print(f"\ranswering {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
        elif done * 10 // total > self.shown_decile:
            self.shown_decile = done * 10 // total
            print(f"answering {done}/{total}", file=sys.stderr, flush=True)


def default_report_path(model_arg):
    path = Path(model_arg)
    return (path if path.is_dir() else path.parent) / EVAL_REPORT_NAME
