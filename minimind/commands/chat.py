"""`minimind chat`: talk with a trained model in the terminal.

    minimind chat --model output/final --system "You are a concise assistant."
"""
import sys
from dataclasses import asdict

from .flags import Parser, bounded
from .inference_flags import (add_model_arguments, add_open_thinking, add_quantize_argument, add_sampling_arguments,
                              load_model_from_flags, sampling_from_flags)

HELP = "chat with a trained model in the terminal"


def parser(prog="minimind chat"):
    parser = Parser(prog=prog, description="Chat with a trained model. Type a message and Enter; /reset forgets the "
                                           "conversation, /exit (or Ctrl-D) quits.")
    add_model_arguments(parser)
    add_quantize_argument(parser)
    parser.add_argument("--system", default=None, help="system message [the template's default]")
    parser.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=None,
                        help="context window for the history [the context the model was trained with]")
    add_open_thinking(parser)
    add_sampling_arguments(parser)
    return parser


def run(args):
    # torch and the model code load here, after the flags were checked (--help stays instant)
    from ..inference.chat import ReplyFormatter, ends_inside_thinking, trim_history
    from ..inference.decoding import stream_text
    from ..inference.loading import trained_context
    from ..inference.prepared import prepare

    sampling = asdict(sampling_from_flags(args))
    model, tokenizer = load_model_from_flags(args, quantize=args.quantize)
    context = min(args.max_seq_len or trained_context(model.config), model.config.max_position_embeddings)
    model = prepare(model)  # once: every turn decodes with the same prepared weights
    sampling["max_new_tokens"] = min(sampling["max_new_tokens"], context // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /reset starts over, /exit or Ctrl-D quits.", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                break
            line = line.strip()
            if not line:
                continue
            if line == "/exit":
                break
            if line == "/reset":
                history = []
                print("(conversation reset)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": line})
            kept, prompt_ids = trim_history(tokenizer, system + history, context - sampling["max_new_tokens"],
                                            args.open_thinking)
            history = kept[len(system):]
            if interactive:
                sys.stdout.write("assistant> ")
            reply = []
            # thinking and tool calls shown apart; the history keeps the reply's own text
            formatter = ReplyFormatter(dim=sys.stdout.isatty(), thinking=ends_inside_thinking(tokenizer, prompt_ids))
            for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
                reply.append(piece)
                sys.stdout.write(formatter.push(piece))
                sys.stdout.flush()
            sys.stdout.write(formatter.finish() + "\n")
            sys.stdout.flush()
            history.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    return 0
