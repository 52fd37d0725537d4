"""What the server tells its operator: one log line per API request, and /metrics in Prometheus's text
format (prometheus-client).

    INFO request 200 POST /v1/chat/completions prompt=31 completion=64 first_token=0.042s total=0.81s

Metrics (each name prefixed minimind_):
    requests_total{endpoint, status}          API requests answered
    prompt_tokens_total, completion_tokens_total
    queue_length                              requests waiting for a row
    running_requests                          requests holding a row (prefilling or decoding)
    batch_size                                rows decoded together, per engine step (histogram)
    prefill_tokens_total                      prompt tokens fed to the model (chunked prefill included)
    time_to_first_token_seconds               per request (histogram)
    request_duration_seconds                  per request, to its last byte (histogram)
    engine_step_seconds                       per engine step (histogram)

`RequestLog` is plain ASGI middleware around the app: it sees each response's status and its last
byte (for a stream, the end of the stream), and reads the request's job, if it had one, from the
request's state (server.Server.answer puts it there).
"""
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LOG = logging.getLogger("minimind.serve")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("minimind_requests", "API requests answered", ["endpoint", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("minimind_prompt_tokens", "prompt tokens of answered requests", registry=registry)
        self.completion_tokens = Counter("minimind_completion_tokens", "tokens generated", registry=registry)
        self.prefill_tokens = Counter("minimind_prefill_tokens", "prompt tokens fed to the model", registry=registry)
        Gauge("minimind_queue_length", "requests waiting for a row", registry=registry).set_function(
            lambda: len(engine.waiting))
        Gauge("minimind_running_requests", "requests holding a row (prefilling or decoding)",
              registry=registry).set_function(lambda: len(engine.running))
        self.batch_size = Histogram("minimind_batch_size", "rows decoded together, per engine step",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.step_seconds = Histogram("minimind_engine_step_seconds", "seconds per engine step",
                                      buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("minimind_time_to_first_token_seconds", "seconds from a request's arrival to "
                                     "its first token", buckets=LATENCY_BUCKETS, registry=registry)
        self.duration = Histogram("minimind_request_duration_seconds", "seconds from a request's arrival to its "
                                  "last byte", buckets=LATENCY_BUCKETS, registry=registry)

    def observe_step(self, decoding_rows, prefill_tokens, seconds):
        """Called by the engine's thread after every step."""
        if decoding_rows:
            self.batch_size.observe(decoding_rows)
        self.prefill_tokens.inc(prefill_tokens)
        self.step_seconds.observe(seconds)

    def observe_request(self, endpoint, status, job, seconds):
        self.requests.labels(endpoint, str(status)).inc()
        self.duration.observe(seconds)
        if job is not None:
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.completion_tokens.inc(len(job.token_ids))
            if job.first_token_at is not None:
                self.first_token.observe(job.first_token_at - job.submitted)

    def text(self):
        return generate_latest(self.registry)


class RequestLog:
    """ASGI middleware: after the last byte of each /v1 response, one log line and the request's metrics."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        started, status, logged = time.monotonic(), [None], [False]

        def finish():
            if logged[0]:
                return
            logged[0] = True
            job = scope.get("state", {}).get("job")
            seconds = time.monotonic() - started
            self.metrics.observe_request(scope["path"], status[0] or 499, job, seconds)
            LOG.info(request_line(scope["method"], scope["path"], status[0] or 499, job, seconds))

        async def logged_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                finish()

        try:
            await self.app(scope, receive, logged_send)
        finally:
            finish()  # a client that left mid-stream: logged with what it got (499 if nothing was sent)


def request_line(method, path, status, job, seconds):
    """'request 200 POST /v1/chat/completions prompt=31 completion=64 first_token=0.042s total=0.81s'."""
    line = f"request {status} {method} {path}"
    if job is not None:
        first = f"{job.first_token_at - job.submitted:.3f}s" if job.first_token_at is not None else "-"
        line += f" prompt={len(job.prompt_ids)} completion={len(job.token_ids)} first_token={first}"
        if job.cancelled:
            line += " cancelled"
    return line + f" total={seconds:.3f}s"
