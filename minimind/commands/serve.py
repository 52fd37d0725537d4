"""`minimind serve`: an OpenAI-compatible HTTP API and a chat page over a trained model
(docs/serving.md).

    minimind serve --model output/final --port 8000
"""
import sys

from . import inputs
from .flags import Parser, bounded
from .inference_flags import add_model_arguments, load_model_from_flags

HELP = "an OpenAI-compatible HTTP server and chat page; concurrent requests decode in one batch"


def parser(prog="minimind serve"):
    parser = Parser(prog=prog,
                    description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                "/v1/completions, /v1/models) with a chat page at /. Concurrent requests are "
                                "decoded together in one batch (docs/serving.md).")
    add_model_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to listen on")
    group.add_argument("--served_model_name", default=None,
                       help="the model id clients send and /v1/models lists [the --model argument]")
    group.add_argument("--max_batch_size", type=bounded(int, 1, 4096), default=16, help="requests decoded together at most")
    group.add_argument("--max_queue", type=bounded(int, 0, 1 << 20), default=64,
                       help="requests that may wait for a place in the batch; beyond them the server answers 503")
    group.add_argument("--max_seq_len", type=bounded(int, 2, 1 << 20), default=None,
                       help="context per request, prompt + reply tokens [the model's max_position_embeddings]")
    return parser


def check(args):
    inputs.model_flags(args)


def run(args):
    # torch, fastapi and the model code load here, after the flags were checked (--help stays instant)
    import uvicorn

    from ..inference.serving.engine import BatchingEngine
    from ..inference.serving.server import check_port_free, create_app

    check_port_free(args.host, args.port)
    model, tokenizer = load_model_from_flags(args)
    engine = BatchingEngine(model, tokenizer, args.max_batch_size, args.max_queue, args.max_seq_len)
    name = args.served_model_name or args.model
    print(f"serving {name!r} (context {engine.context_length} tokens) at http://{args.host}:{args.port}/ "
          f"(chat page) and http://{args.host}:{args.port}/v1 (OpenAI API)", file=sys.stderr)
    uvicorn.run(create_app(engine, name), host=args.host, port=args.port, access_log=False, log_level="info")
    return 0
