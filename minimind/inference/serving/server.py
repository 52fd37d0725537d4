"""`minimind serve`: an OpenAI-compatible HTTP server and a chat page, on FastAPI and uvicorn.

    minimind serve --model output/sft/final --port 8000

    GET  /                      the chat page (minimind/assets/chat/)
    GET  /health                liveness, and the engine's counters (running, waiting, largest batch)
    GET  /metrics               Prometheus metrics (metrics.py)
    GET  /v1/models             the one model served
    POST /v1/chat/completions   messages -> reply, whole or as server-sent events
    POST /v1/completions        text -> continuation, whole or as server-sent events

Each request is checked (protocol.py), tokenized, and handed to the BatchingEngine (engine.py),
whose thread decodes all requests in one batch; its updates come back to the request's asyncio
task through an UpdateChannel. A client that goes away cancels its job, which frees its row.
With an API key, every /v1 request must carry it as `Authorization: Bearer KEY` (as OpenAI's
clients send it) or gets 401. Each /v1 request ends with one log line (metrics.RequestLog).
"""
import asyncio
import hmac
import ipaddress
import json
import math
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ...data.conversations import encode_chat
from ...errors import UserError
from . import protocol
from .engine import QueueFull, Update
from .metrics import Metrics, RequestLog
from .protocol import ApiError, ChatFormat, CompletionFormat

CHAT_PAGE = Path(__file__).resolve().parents[2] / "assets" / "chat"
MAX_BODY_BYTES = 4 * 2**20  # a full 32k-token context is ~150 KB of text; more is a mistake or an attack
# A non-streaming request whose client left: logged and counted as 499 (nginx's "client closed request"),
# not as a server error.
CLIENT_LEFT = "the client disconnected"
STREAM_INTERVAL = 0.05  # seconds: a stream's text goes out at most 20 times a second (docs/serving.md, "Streams")


class Mailbox:
    """Carries updates from the engine's thread into the event loop, waking the loop once for all
    the updates posted while it was busy (one wake-up per decode step, not one per row and token)."""

    def __init__(self, loop):
        self.loop, self.lock, self.pending, self.scheduled = loop, threading.Lock(), [], False

    def post(self, queue, updates):
        """Called in the engine's thread: queue.put_nowait(update) for each of `updates`, soon, in the loop."""
        with self.lock:
            self.pending += [(queue, update) for update in updates]
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self):
        with self.lock:
            pending, self.pending, self.scheduled = self.pending, [], False
        for queue, update in pending:
            queue.put_nowait(update)


class UpdateChannel:
    """One job's updates, read by the asyncio task answering its request. The engine's thread holds
    them back until `interval` seconds have passed since it last passed text on: the first text and
    the last update go at once, the text between in pieces of that many seconds' tokens (interval 0:
    every update at once; math.inf: only the last, for a whole reply). Each piece costs a wake-up of
    the event loop, an event on the wire and the client's parsing of it, on the cores that decode."""

    def __init__(self, mailbox, interval=0.0, clock=time.monotonic):
        self.mailbox, self.queue, self.interval, self.clock = mailbox, asyncio.Queue(), interval, clock
        self.held, self.text_sent_at = [], None

    def put(self, update):
        self.held.append(update)
        now = self.clock()
        if update.finish_reason or update.error:
            due = True
        elif self.text_sent_at is None:  # nothing read yet: the first text goes at once, unless a whole reply
            due = bool(update.text) and self.interval < math.inf
        else:
            due = now - self.text_sent_at >= self.interval
        if due:
            if any(held.text for held in self.held):
                self.text_sent_at = now
            self.mailbox.post(self.queue, self.held)
            self.held = []

    async def get_all(self):
        """The next update and any that arrived with it: a slow reader gets fewer, larger pieces."""
        updates = [await self.queue.get()]
        while not self.queue.empty():
            updates.append(self.queue.get_nowait())
        return updates


async def read_json(request):
    """The body as a JSON object, or an ApiError (413 when too large, 400 when not a JSON object)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body has {declared} bytes; the limit is {MAX_BODY_BYTES}",
                       code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes",
                           code="request_too_large")
    try:
        data = json.loads(body)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        raise ApiError(400, f"the request body is not valid JSON ({error}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


def sse(data):
    """One server-sent event: `data: <json>` and a blank line."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """The HTTP side: turns requests into engine jobs and job updates into OpenAI responses."""

    def __init__(self, engine, model_name, stream_interval=STREAM_INTERVAL):
        self.engine, self.model_name, self.stream_interval = engine, model_name, stream_interval
        self.mailbox = None  # made in the event loop when the app starts

    async def chat_completions(self, request: Request):
        body = await read_json(request)
        protocol.check_model(body, self.model_name)
        messages, params = protocol.chat_messages(body), protocol.sampling_params(body)
        stream, include_usage = protocol.streaming(body)
        prompt_ids = await run_in_threadpool(encode_chat, self.engine.tokenizer, messages)
        protocol.check_prompt_length(len(prompt_ids), self.engine.context_length, "messages")
        return await self.answer(request, prompt_ids, params, stream, ChatFormat(self.model_name, include_usage))

    async def completions(self, request: Request):
        body = await read_json(request)
        protocol.check_model(body, self.model_name)
        params = protocol.sampling_params(body)
        stream, include_usage = protocol.streaming(body)
        prompt_ids = await run_in_threadpool(protocol.completion_prompt, body, self.engine.tokenizer,
                                             self.engine.model.config.vocab_size)
        protocol.check_prompt_length(len(prompt_ids), self.engine.context_length, "prompt")
        echo = protocol.flag(body, "echo")
        echo_text = self.engine.tokenizer.decode(prompt_ids) if echo else ""
        return await self.answer(request, prompt_ids, params, stream,
                                 CompletionFormat(self.model_name, include_usage, echo_text))

    async def answer(self, request, prompt_ids, params, stream, response_format):
        channel = UpdateChannel(self.mailbox, self.stream_interval if stream else math.inf)
        try:
            job = self.engine.submit(prompt_ids, params, channel.put)
        except QueueFull as error:
            raise ApiError(503, f"The server is busy: {error}", code="queue_full", type="server_error") from None
        request.state.job = job  # for the request's log line and metrics
        if stream:
            return StreamingResponse(self.events(job, channel, response_format), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self.whole_response(request, job, channel, response_format)

    async def events(self, job, channel, response_format):
        """The server-sent events of one job. Starlette cancels this generator when the client
        disconnects; `finally` then cancels the job, so its row leaves the batch after this step."""
        try:
            first = response_format.first_chunk()
            if first:
                yield sse(first)
            while True:
                updates = await channel.get_all()
                text, last = "".join(u.text for u in updates), updates[-1]
                if text:
                    yield sse(response_format.chunk(text))
                if last.error:
                    yield sse(ApiError(500, last.error, code="generation_failed", type="server_error").body())
                    break
                if last.finish_reason:
                    yield sse(response_format.chunk("", last.finish_reason))
                    if response_format.include_usage:
                        yield sse(response_format.usage_chunk(len(job.prompt_ids), last.completion_tokens))
                    break
            yield "data: [DONE]\n\n"
        finally:
            self.engine.cancel(job)

    async def whole_response(self, request, job, channel, response_format):
        """Wait for the job to finish; if the client disconnects first, cancel it."""
        watcher = asyncio.create_task(self.cancel_on_disconnect(request, job, channel))
        pieces = []
        try:
            while True:
                updates = await channel.get_all()
                pieces += [u.text for u in updates]
                last = updates[-1]
                if last.error == CLIENT_LEFT:  # nobody reads this answer: it is for the log and the metrics
                    raise ApiError(499, last.error, code="client_closed_request")
                if last.error:
                    raise ApiError(500, last.error, code="generation_failed", type="server_error")
                if last.finish_reason:
                    return JSONResponse(response_format.response(
                        "".join(pieces), last.finish_reason, len(job.prompt_ids), last.completion_tokens))
        finally:
            watcher.cancel()
            self.engine.cancel(job)

    async def cancel_on_disconnect(self, request, job, channel):
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(job)
        channel.queue.put_nowait(Update("", len(job.token_ids), error=CLIENT_LEFT))

    def models(self):
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self):
        return {"id": self.model_name, "object": "model", "created": 0, "owned_by": "minimind",
                "max_model_len": self.engine.context_length}


def api_key_check(api_key):
    """A FastAPI dependency that lets a request through only with `Authorization: Bearer <api_key>`
    (none when api_key is None), else 401 in OpenAI's shape."""
    async def check(request: Request):
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "You didn't provide an API key. Send it in an Authorization header using Bearer "
                                "auth (Authorization: Bearer YOUR_KEY); the openai client does so with api_key=...",
                           status_headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: it is not the key this server was started with "
                                "(--api_key or MINIMIND_API_KEY).", code="invalid_api_key",
                           status_headers={"WWW-Authenticate": "Bearer"})
    return check


def create_app(engine, model_name, api_key=None, engine_thread=True, stream_interval=STREAM_INTERVAL):
    """The FastAPI application; starting it starts the engine's thread, stopping it stops the engine.
    api_key: when given, every /v1 request must carry it (api_key_check). stream_interval: seconds
    a stream's text is held at most (UpdateChannel). engine_thread=False: the caller runs
    engine.serve_forever() in a thread of its own choosing (the serve command: its main thread, see
    commands/serve.py)."""
    server = Server(engine, model_name, stream_interval)
    metrics = Metrics(engine)
    engine.observe_step = metrics.observe_step

    @asynccontextmanager
    async def lifespan(app):
        server.mailbox = Mailbox(asyncio.get_running_loop())
        if engine_thread:
            engine.start()
        yield
        engine.stop()

    # No /docs: its page loads scripts from the internet.
    app = FastAPI(title="minimind", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestLog, metrics=metrics)
    authorized = [Depends(api_key_check(api_key))]

    @app.exception_handler(ApiError)
    async def api_error(request, error):
        headers = {"Retry-After": "1"} if error.status == 503 else error.status_headers
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, error):
        message = {404: f"no route {request.method} {request.url.path}; the API is under /v1",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return JSONResponse(ApiError(error.status_code, message).body(), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def server_error(request, error):
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}",
                                     type="server_error").body(), status_code=500)

    app.post("/v1/chat/completions", dependencies=authorized)(server.chat_completions)
    app.post("/v1/completions", dependencies=authorized)(server.completions)
    app.get("/v1/models", dependencies=authorized)(server.models)

    @app.get("/v1/models/{model_id:path}", dependencies=authorized)
    async def model(model_id: str):
        protocol.check_model({"model": model_id}, model_name)
        return server.model_card()

    @app.get("/health")
    async def health():
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": model_name, **engine.status()},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(metrics.text(), media_type=metrics.content_type)

    @app.get("/")
    async def chat_page():
        return FileResponse(CHAT_PAGE / "index.html")

    app.mount("/chat", StaticFiles(directory=CHAT_PAGE), name="chat")
    return app


def check_port_free(host, port):
    """Fail early, in one line, when the address is taken or unknown (uvicorn would log and exit)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((host, port), family=family):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise UserError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None


def is_loopback(host):
    """Whether only this machine can reach `host` (127.0.0.1, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
