"""`minimind chat`: talk with a trained model in the terminal.

    minimind chat --model output/final --system "You are a concise assistant."
"""
import re
import sys
from dataclasses import asdict

from . import inputs
from .flags import Parser, bounded
from .inference_flags import (add_decoder_arguments, add_model_arguments, add_open_thinking, add_sampling_arguments,
                              check_backend, load_decoder_from_flags, sampling_from_flags)

HELP = "chat with a trained model in the terminal"


def parser(prog="minimind chat"):
    parser = Parser(prog=prog, description="Chat with a trained model. Type a message and Enter; /help lists the "
                                           "commands (/reset, /exit); Ctrl-C stops a reply, Ctrl-D quits.")
    add_model_arguments(parser)
    add_decoder_arguments(parser)
    parser.add_argument("--system", default=None, help="system message [the template's default]")
    parser.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=None,
                        help="context window for the history [the context the model was trained with]")
    add_open_thinking(parser)
    add_sampling_arguments(parser)
    return parser


def check(args):
    inputs.model_flags(args)
    check_backend(args)


COMMANDS = {"/help": "list these commands", "/reset": "forget the conversation (the system message stays)",
            "/exit": "quit (Ctrl-D, or Ctrl-C at the prompt, too)"}
COMMAND = re.compile(r"/[A-Za-z]+")  # "/help"; "/usr/bin is a folder" is a message


def run(args):
    # torch and the model code load here, after the flags were checked (--help stays instant)
    from ..inference.chat import trim_history
    from ..inference.loading import trained_context

    sampling = asdict(sampling_from_flags(args))
    _, model, tokenizer = load_decoder_from_flags(args, time_threads=True)  # prepared once: every turn decodes with it
    context = min(args.max_seq_len or trained_context(model.config), model.config.max_position_embeddings)
    sampling["max_new_tokens"] = min(sampling["max_new_tokens"], context // 2)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chat with the model. /help lists the commands; Ctrl-C stops a reply, Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D, or Ctrl-C at the prompt: leave
            sys.stdout.write("\n" if interactive else "")
            return 0
        if not line:
            continue
        if COMMAND.fullmatch(line.split()[0]):
            if line.split()[0] == "/exit":
                return 0
            history = chat_command(line.split()[0], history)
            continue
        history.append({"role": "user", "content": line})
        kept, prompt_ids = trim_history(tokenizer, system + history, context - sampling["max_new_tokens"],
                                        args.open_thinking)
        history = kept[len(system):]
        if interactive:
            sys.stdout.write("assistant> ")
        history.append({"role": "assistant", "content": stream_reply(model, tokenizer, prompt_ids, sampling)})


def chat_command(name, history):
    """/help or /reset (or an unknown one): what it says, and the history after it."""
    if name == "/help":
        print("\n".join(f"  {command:<8} {what}" for command, what in COMMANDS.items()) +
              "\n  Ctrl-C   stop the reply being written", file=sys.stderr)
    elif name == "/reset":
        print("(conversation reset)", file=sys.stderr)
        return []
    else:
        print(f"unknown command {name}; /help lists the commands", file=sys.stderr)
    return history


def stream_reply(model, tokenizer, prompt_ids, sampling):
    """Write the reply as it comes; Ctrl-C stops it there. Returns its text (the history keeps it raw:
    thinking and tool calls as the model wrote them, shown apart by ReplyFormatter)."""
    from ..inference.chat import ReplyFormatter, ends_inside_thinking
    from ..inference.decoding import stream_text

    reply = []
    formatter = ReplyFormatter(dim=sys.stdout.isatty(), thinking=ends_inside_thinking(tokenizer, prompt_ids))
    try:
        for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
            reply.append(piece)
            sys.stdout.write(formatter.push(piece))
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(formatter.finish() + "\n")
        print("(reply stopped)", file=sys.stderr)
    else:
        sys.stdout.write(formatter.finish() + "\n")
    sys.stdout.flush()
    return "".join(reply)
