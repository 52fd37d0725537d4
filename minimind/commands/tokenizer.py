"""`minimind tokenizer train`: a byte-level BPE tokenizer trained on your text (docs/data.md).

    minimind tokenizer train --data data/pretrain.jsonl --vocab_size 6400 --output_dir my_tokenizer
"""
from . import inputs
from .flags import Parser, add_boolean, bounded

HELP = "train a byte-level BPE tokenizer on your text"


def parser(prog="minimind tokenizer"):
    parser = Parser(prog=prog, description="Train a byte-level BPE tokenizer on your text.")
    verbs = parser.add_subparsers(dest="verb", required=True, parser_class=Parser)
    train = verbs.add_parser("train", help="train a byte-level BPE tokenizer on data files",
                             formatter_class=parser.formatter_class)
    train.add_argument("--data", nargs="+", required=True,
                       help="data files or glob patterns (.jsonl, .json, .txt; pretraining, SFT or DPO)")
    train.add_argument("--vocab_size", type=bounded(int, 259, 1 << 20), default=6400,
                       help="tokens in the vocabulary, the 256 bytes and 3 special tokens included")
    train.add_argument("--output_dir", "--out", required=True,
                       help="folder for tokenizer.json and tokenizer_config.json (--out is the same flag)")
    add_boolean(train, "--skip_bad_records", help="skip malformed records (and report them) instead of stopping")
    return parser


def check(args):
    inputs.data_files("--data", args.data)


def run(args):
    # tokenizers and transformers load here, after the flags were checked (--help stays instant)
    from ..data.records import SkippedRecords, expand_paths
    from ..data.tokenizer import train_tokenizer

    stats = SkippedRecords()
    files = expand_paths(args.data)
    tokenizer = train_tokenizer(files, args.vocab_size, args.output_dir, args.skip_bad_records, stats)
    if stats:
        print(stats.describe())
    print(f"trained a tokenizer with {len(tokenizer)} tokens on {len(files)} file(s); saved to {args.output_dir}")
    if len(tokenizer) < args.vocab_size:
        print(f"note: the data only supports {len(tokenizer)} tokens (every word is already one token); "
              f"add more text to reach --vocab_size {args.vocab_size}")
    return 0
