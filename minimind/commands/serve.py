"""`minimind serve`: an OpenAI-compatible HTTP API and a chat page over a trained model
(docs/serving.md).

    minimind serve --model output/final --port 8000
"""
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager

from . import inputs
from .flags import Parser, bounded
from .inference_flags import add_decoder_arguments, add_model_arguments, check_backend, load_decoder_from_flags

HELP = "an OpenAI-compatible HTTP server and chat page; concurrent requests decode in one batch"
API_KEY_VARIABLE = "MINIMIND_API_KEY"
SECOND_SIGNAL_GRACE = 2.0  # seconds uvicorn has, after a second Ctrl-C, to send the replies' last words


def parser(prog="minimind serve"):
    parser = Parser(prog=prog,
                    description="Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, "
                                "/v1/completions, /v1/models) with a chat page at / and Prometheus metrics at "
                                "/metrics. Concurrent requests are decoded together in one batch; long prompts are "
                                "read in chunks between decoding steps (docs/serving.md).")
    add_model_arguments(parser)
    add_decoder_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    group.add_argument("--port", type=bounded(int, 0, 65535), default=8000, help="port to listen on")
    group.add_argument("--served_model_name", default=None,
                       help="the model id clients send and /v1/models lists [the --model argument]")
    group.add_argument("--api_key", default=None,
                       help=f"require this key from every API request (Authorization: Bearer KEY, as OpenAI's "
                            f"clients send it) [${API_KEY_VARIABLE}, else none]")
    group.add_argument("--max_batch_size", type=bounded(int, 1, 4096), default=16, help="requests decoded together at most")
    group.add_argument("--max_queue", type=bounded(int, 0, 1 << 20), default=64,
                       help="requests that may wait for a place in the batch; beyond them the server answers 503")
    group.add_argument("--max_model_len", "--max_seq_len", dest="max_model_len", type=bounded(int, 2, 1 << 20),
                       default=None, help="context per request, prompt + reply tokens [the context the model was "
                                          "trained with, else its max_position_embeddings]")
    group.add_argument("--prefill_chunk", type=bounded(int, 16, 1 << 20), default=512,
                       help="prompt tokens read per engine step, between decoding steps: smaller keeps replies "
                            "flowing while a long prompt is read, larger reads it faster")
    group.add_argument("--stream_interval", type=bounded(float, 0, 10), default=0.05,  # server.STREAM_INTERVAL
                       help="seconds a stream's new text is held at most, to go out with the tokens after it (the "
                            "first text and the end at once): fewer events for the client and the server to handle; "
                            "0 sends every token as it comes")
    return parser


def check(args):
    inputs.model_flags(args)
    check_backend(args)


def run(args):
    # torch, fastapi and the model code load here, after the flags were checked (--help stays instant)
    import logging

    import uvicorn

    from ..inference.loading import trained_context
    from ..inference.serving.engine import BatchingEngine
    from ..inference.serving.server import check_port_free, create_app, is_loopback
    from ..inference.threads import set_threads

    api_key = args.api_key or os.environ.get(API_KEY_VARIABLE) or None
    check_port_free(args.host, args.port)
    model, decoder, tokenizer = load_decoder_from_flags(args)
    default_threads = torch_threads()
    few_threads, threads = thread_counts(args, model)
    context = args.max_model_len or trained_context(model.config)
    engine = BatchingEngine(decoder, tokenizer, args.max_batch_size, args.max_queue, context,
                            prefill_chunk=args.prefill_chunk, few_threads=few_threads)
    name = args.served_model_name or args.model
    print(f"serving {name!r} (context {engine.context_length} tokens{describe_decoder(args)}"
          f"{threads}) at http://{args.host}:{args.port}/ (chat page) and http://{args.host}:{args.port}/v1 (OpenAI API)",
          file=sys.stderr)
    if api_key is None and not is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who reaches this port can use the "
              f"model (--api_key KEY or ${API_KEY_VARIABLE})", file=sys.stderr)
    handler = logging.StreamHandler(sys.stderr)  # the request log lines (serving/metrics.py)
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log = logging.getLogger("minimind.serve")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, name, api_key, engine_thread=False,
                                                      stream_interval=args.stream_interval), host=args.host,
                                           port=args.port, access_log=False, log_level="info"))
    try:
        if not serve_beside_engine(server, engine):
            return 1  # uvicorn said why
    finally:
        log.removeHandler(handler)
        set_threads(default_threads)  # a serve run inside a Python process leaves its threads as found
    return 0


def serve_beside_engine(server, engine):
    """uvicorn in a thread of its own, the engine's steps in this thread (the one that loaded the
    model). Why not the other way round: the model's arithmetic runs in OpenMP threads, and a thread
    other than the one that started them gets a second team of its own, whose products wait for
    each other's threads more: on 2 cores a decoding step on two threads took 1.5x as long
    (docs/benchmarks.md, "Serving under load"). The first Ctrl-C or SIGTERM stops taking requests
    and lets the replies in flight finish; a second one ends them after the step under way (each
    gets "the server is shutting down") and gives uvicorn SECOND_SIGNAL_GRACE seconds to send
    that and close. Returns whether the server had started.

    The signals only set flags, which the engine reads between steps. A handler that raised
    (KeyboardInterrupt) would land between any two lines of this thread, for instance after an
    update was handed to the event loop but before the loop was woken, and leave that stream
    waiting forever for the update that ends it."""
    http = threading.Thread(target=server.run, name="minimind-http", daemon=True)
    http.start()
    received = []

    def on_signal():  # in a signal handler: flags only, no locks, no exceptions
        received.append(time.monotonic())
        engine.closing = True  # no new requests; the engine stops when the replies in flight are done
        server.should_exit = True
        if len(received) > 1:
            engine.stopping = True  # the replies in flight end after this step

    with on_stop_signals(on_signal):
        try:
            engine.serve_forever(keep_going=http.is_alive)  # what is left fails on the way out: streams end
        finally:
            server.should_exit = True
            wait_for_http(http, received)
    return server.started


def wait_for_http(thread, received):
    """Until uvicorn's thread has ended, or SECOND_SIGNAL_GRACE seconds after a second signal: then
    this returns with uvicorn still waiting on a connection (a client that keeps one open), and
    its thread, a daemon, ends with the process. (uvicorn's own way out, force_exit, cancels what
    still runs and prints a traceback for each.)"""
    while thread.is_alive():
        thread.join(timeout=0.1)
        if len(received) > 1 and time.monotonic() - received[1] > SECOND_SIGNAL_GRACE:
            return


@contextmanager
def on_stop_signals(handle):
    """Ctrl-C (SIGINT) and SIGTERM call handle() (in the main thread, between two bytecodes of
    whatever it was running: handle must only set flags), instead of what they did before, until
    the block ends. Only in the main thread (where Python runs signal handlers); elsewhere nothing
    changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, lambda signum, frame: handle())
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, action in previous.items():
            signal.signal(number, action)


def thread_counts(args, model):
    """On the CPU, without --num_threads: each decoding step on one thread fewer than torch's default
    or on all of them, whichever has decoded that many rows faster so far (an idle machine: all; a
    core taken by another process: fewer), and a prompt on every thread (inference/threads.py,
    ThreadPolicy, has the measurements). With --backend llama.cpp every pass
    uses every thread (docs/benchmarks.md, "Serving under load").
    Returns (the fewer threads, or None for a fixed count; the words for the start-up line)."""
    from ..inference.threads import cpu_thread_policy

    policy = None if args.num_threads else cpu_thread_policy(next(model.parameters()).device)
    if policy is None:
        return None, ""
    if args.backend == "llama.cpp":  # llama.cpp reads one row faster from every core: 94 against 79 tokens/s
        return None, f", {policy.many} CPU threads"
    return policy.few, f", {policy.few} or {policy.many} CPU threads, whichever decodes faster"


def describe_decoder(args):
    """The start-up line's words for --backend and --quantize."""
    words = ", llama.cpp" if args.backend == "llama.cpp" else ""
    if args.quantize:
        words += ", q8_0 weights" if args.backend == "llama.cpp" else ", int8 weights"
    return words


def torch_threads():
    import torch
    return torch.get_num_threads()
