"""`minimind generate`: continue a prompt (or answer it as a chat turn) with a trained model.

    minimind generate --model output/final --prompt "Velwen is"          (raw continuation)
    minimind generate --model output/final --prompt "Add 3 and 4." --chat
"""
import sys
from dataclasses import asdict

from . import inputs
from .flags import Parser, add_boolean
from .inference_flags import (add_decoder_arguments, add_model_arguments, add_open_thinking, add_sampling_arguments,
                              check_backend, load_decoder_from_flags, sampling_from_flags)

HELP = "continue a prompt with a trained model"


def parser(prog="minimind generate"):
    parser = Parser(prog=prog, description="Continue a prompt with a trained model.")
    add_model_arguments(parser)
    add_decoder_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the text to continue ('' starts from nothing)")
    add_boolean(parser, "--chat", help="wrap the prompt in the chat template as a user turn")
    parser.add_argument("--system", default=None, help="system message (with --chat) [the template's default]")
    add_open_thinking(parser)
    add_sampling_arguments(parser)
    return parser


def check(args):
    inputs.model_flags(args)
    check_backend(args)


def run(args):
    # torch and the model code load here, after the flags were checked (--help stays instant)
    from ..data.conversations import encode_chat
    from ..inference.chat import ReplyFormatter, ends_inside_thinking
    from ..inference.decoding import stream_text

    sampling = asdict(sampling_from_flags(args))
    _, model, tokenizer = load_decoder_from_flags(args, time_threads=True)
    formatter = None
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt_ids = encode_chat(tokenizer, messages, args.open_thinking)
        formatter = ReplyFormatter(dim=sys.stdout.isatty(), thinking=ends_inside_thinking(tokenizer, prompt_ids))
    else:
        prompt_ids = tokenizer(args.prompt, add_special_tokens=False)["input_ids"]
        sys.stdout.write(args.prompt)
    try:
        for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
            sys.stdout.write(formatter.push(piece) if formatter else piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    sys.stdout.write((formatter.finish() if formatter else "") + "\n")
    return 0
