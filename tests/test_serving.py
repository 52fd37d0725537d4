"""minimind serve: the official openai client, raw server-sent events, bad requests, batching of
concurrent requests, disconnects, the queue bound, the `serve` command and the chat page in a browser.

The server runs in a thread on 127.0.0.1 over a tiny model that has memorized three chat replies,
so greedy answers are real sentences that can be compared exactly. A Gate around the model lets a
test hold the engine inside a forward pass, so that "requests arrive together" or "the client left
while its row was decoding" happen for certain, not by timing.
"""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
import uvicorn

from minimind.commands.main import main as cli_main
from minimind.data.conversations import encode_chat
from minimind.data.tokenizer import load_tokenizer
from minimind.inference.decoding import generate
from minimind.inference.kv_cache import SlotCache
from minimind.inference.loading import load_for_inference, trained_context
from minimind.inference.prepared import PreparedModel
from minimind.inference.serving.engine import BatchingEngine, QueueFull, Update
from minimind.inference.serving.server import UpdateChannel, create_app
from minimind.inference.settings import SamplingSettings
from minimind.inference.threads import ThreadPolicy
from minimind.model.config import MiniMindConfig
from minimind.model.model import MiniMindForCausalLM

from .conftest import memorize

CONTEXT = 256
MODEL_NAME = "tiny-chat"
CHATS = {
    "What is Velwen?": "Velwen is a quiet river town in the north.",
    "Add 3 and 4.": "3 and 4 make 7.",
    "Say hello in French.": "Bonjour! That is hello in French.",
}


def tiny_model(seed=0, context=CONTEXT):
    torch.manual_seed(seed)
    config = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=context)
    return MiniMindForCausalLM(config)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tokenizer):
    """A tiny model trained until its greedy reply to each question in CHATS is the answer."""
    sequences = [encode_chat(tokenizer, user(question)) + tokenizer(answer + "<|im_end|>")["input_ids"]
                 for question, answer in CHATS.items()]
    width = max(map(len, sequences))
    model = tiny_model()
    memorize(model, torch.tensor([ids + [0] * (width - len(ids)) for ids in sequences]), steps=100)
    folder = tmp_path_factory.mktemp("chat_model")
    model.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


class Gate(PreparedModel):
    """The prepared model, with a switch: inside `held(after=n)`, n more passes (prefill or step) go
    through and the next one waits (setting `blocked`) until `release()` or the end of the block."""

    def __init__(self, model):
        super().__init__(model)
        self.opened, self.blocked, self.passes_left = threading.Event(), threading.Event(), None
        self.opened.set()

    def prefill(self, *args, **kwargs):
        self.wait_if_held()
        return super().prefill(*args, **kwargs)

    def step(self, *args, **kwargs):
        self.wait_if_held()
        return super().step(*args, **kwargs)

    def wait_if_held(self):
        if self.passes_left == 0:
            self.blocked.set()
            self.opened.wait()
        elif self.passes_left is not None:
            self.passes_left -= 1

    @contextmanager
    def held(self, after=0):
        """Hold the engine after `after` more passes, for the `with` block (a failing test cannot
        leave it held for the next)."""
        self.blocked.clear()
        self.opened.clear()
        self.passes_left = after
        try:
            yield
        finally:
            self.release()

    def release(self):
        self.passes_left = None
        self.opened.set()


@contextmanager
def running_server(app):
    """Serve `app` with uvicorn in a thread on a free port of 127.0.0.1; yields the base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server to start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition, what, timeout=30):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture(scope="module")
def served(chat_model_dir):
    model, tokenizer = load_for_inference(str(chat_model_dir))
    gate = Gate(model)
    engine = BatchingEngine(gate, tokenizer, max_batch_size=4, max_queue=3)
    with running_server(create_app(engine, MODEL_NAME)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, gate=gate, model=model, tokenizer=tokenizer, client=client)


def health(served):
    return httpx.get(f"{served.url}/health").json()


def solo(served, prompt_ids, **sampling):
    """What decoding.generate gives for one prompt alone: the reference for the server's answers."""
    sampling = {"temperature": 0.0, "max_new_tokens": 64, **sampling}
    return generate(served.model, [prompt_ids], tokenizer=served.tokenizer, **sampling)


def sse_events(raw):
    """Raw event-stream text -> the data of each event; checks the framing on the way."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), events
    return [event[len("data: "):] for event in events]


# ---------------------------------------------------------------- the API with the openai client

def test_models_health_and_page(served):
    assert [m.id for m in served.client.models.list()] == [MODEL_NAME]
    assert served.client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("gpt-4")
    status = health(served)
    assert status["status"] == "ok" and status["context_length"] == CONTEXT and status["max_batch_size"] == 4
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and 'src="chat/chat.js"' in page.text
    script = httpx.get(served.url + "/chat/chat.js")
    assert script.status_code == 200 and "/v1/chat/completions" in script.text
    # nothing from the internet: every src/href is this server's or inline
    assert not re.search(r'(src|href)="(https?:)?//', page.text)


def test_greedy_chat_equals_minimind_generate(served, chat_model_dir, capsys):
    for question, answer in CHATS.items():
        reply = served.client.chat.completions.create(model=MODEL_NAME, messages=user(question), temperature=0,
                                                      max_tokens=64)
        assert cli_main(["generate", "--model", str(chat_model_dir), "--prompt", question, "--chat",
                         "--temperature", "0", "--max_new_tokens", "64"]) == 0
        assert reply.choices[0].message.content + "\n" == capsys.readouterr().out
        assert reply.choices[0].message.content == answer
        assert reply.choices[0].finish_reason == "stop"
        prompt_ids = encode_chat(served.tokenizer, user(question))
        assert reply.usage.prompt_tokens == len(prompt_ids)
        assert reply.usage.completion_tokens == len(solo(served, prompt_ids).token_ids[0])


def test_max_tokens_and_max_completion_tokens(served):
    question = "What is Velwen?"
    expected = solo(served, encode_chat(served.tokenizer, user(question)), max_new_tokens=3)
    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}, {"max_tokens": 50, "max_completion_tokens": 3}):
        reply = served.client.chat.completions.create(model=MODEL_NAME, messages=user(question), temperature=0,
                                                      **limit)
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage.completion_tokens == 3
        assert reply.choices[0].message.content == expected.texts[0]


def test_streaming_with_the_openai_client(served):
    question, answer = "Say hello in French.", CHATS["Say hello in French."]
    chunks = list(served.client.chat.completions.create(
        model=MODEL_NAME, messages=user(question), temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(
        solo(served, encode_chat(served.tokenizer, user(question))).token_ids[0])
    assert all(c.usage is None for c in chunks[:-1]) and len({c.id for c in chunks}) == 1
    plain = list(served.client.chat.completions.create(model=MODEL_NAME, messages=user(question), temperature=0,
                                                       stream=True))
    assert plain[-1].choices[0].finish_reason == "stop" and all(c.usage is None for c in plain)


def test_raw_sse_framing(served):
    body = {"messages": user("Add 3 and 4."), "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == CHATS["Add 3 and 4."]


def test_an_update_channel_sends_the_first_text_at_once_and_the_rest_every_interval():
    """What the engine's thread passes to the event loop for one request: a stream's first text and
    its last update at once, the text between once `interval` seconds have passed since text last
    went (each batch one wake-up of the loop, one event for the client); interval 0 every update
    from the first text on; a whole reply (math.inf) only its last, with all before it."""
    class Mailbox:
        def __init__(self):
            self.batches = []

        def post(self, queue, updates):
            self.batches.append("".join(update.text for update in updates)
                                + ("|" + updates[-1].finish_reason if updates[-1].finish_reason else ""))

    def sent(interval, updates):
        now, mailbox = [0.0], Mailbox()
        channel = UpdateChannel(mailbox, interval, clock=lambda: now[0])
        for at, update in updates:
            now[0] = at
            channel.put(update)
        return mailbox.batches

    reply = [(0.00, Update("", 1)), (0.01, Update("Vel", 2)), (0.02, Update("wen", 3)), (0.05, Update(" is", 4)),
             (0.06, Update(" a", 5)), (0.08, Update(" town", 6)), (0.09, Update(".", 7, finish_reason="stop"))]
    assert sent(0.04, reply) == ["Vel", "wen is", " a town.|stop"]
    assert sent(0.0, reply) == ["Vel", "wen", " is", " a", " town", ".|stop"]  # nothing until there is text
    assert sent(math.inf, reply) == ["Velwen is a town.|stop"]
    failed = [(0.0, Update("Vel", 1)), (0.01, Update("wen", 2)), (0.02, Update("", 2, error="generation failed"))]
    assert sent(10.0, failed) == ["Vel", "wen"]  # the error's update goes at once, with the text held before it


def test_a_stream_comes_in_pieces_of_stream_interval(chat_model_dir):
    """Through HTTP, over a model slowed to 20 ms a step: with a long --stream_interval a reply comes
    as its first text and then the rest in one piece; with 0, as one event per token or few."""
    model, tokenizer = load_for_inference(str(chat_model_dir))

    class Slow(PreparedModel):
        def step(self, *args, **kwargs):
            time.sleep(0.02)
            return super().step(*args, **kwargs)

    question, answer = "Say hello in French.", CHATS["Say hello in French."]
    pieces = {}
    for interval in (60.0, 0.0):
        engine = BatchingEngine(Slow(model), tokenizer, max_batch_size=2)
        with running_server(create_app(engine, MODEL_NAME, stream_interval=interval)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
            chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=user(question), temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
        pieces[interval] = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces[interval]) == answer
        assert chunks[-1].usage.completion_tokens == len(solo(SimpleNamespace(model=model, tokenizer=tokenizer),
                                                              encode_chat(tokenizer, user(question))).token_ids[0])
    assert len(pieces[60.0]) == 2
    assert len(pieces[0.0]) > len(answer.split()) // 2


def test_completions_endpoint_streaming_stop_echo(served):
    prompt = served.tokenizer.apply_chat_template(user("What is Velwen?"), tokenize=False, add_generation_prompt=True)
    whole = served.client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, max_tokens=40)
    assert whole.choices[0].text == CHATS["What is Velwen?"] and whole.choices[0].finish_reason == "stop"
    stopped = served.client.completions.create(model=MODEL_NAME, prompt=prompt, temperature=0, stop="river")
    assert stopped.choices[0].text == "Velwen is a quiet " and stopped.choices[0].finish_reason == "stop"
    with httpx.stream("POST", f"{served.url}/v1/completions",
                      json={"prompt": prompt, "temperature": 0, "stream": True, "stop": ["town", "zzz"]}) as response:
        events = sse_events(response.read().decode())
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]" and {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Velwen is a quiet river "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    echoed = served.client.completions.create(model=MODEL_NAME, prompt="Velwen", temperature=0, max_tokens=4,
                                              echo=True)
    alone = solo(served, served.tokenizer("Velwen")["input_ids"], max_new_tokens=4)
    assert echoed.choices[0].text == "Velwen" + alone.texts[0]
    assert echoed.usage.completion_tokens == len(alone.token_ids[0])


def test_seeded_sampling_equals_minimind_generate(served, chat_model_dir, capsys):
    sampling = dict(temperature=1.0, top_p=0.9, seed=7, max_tokens=12)
    first = served.client.completions.create(model=MODEL_NAME, prompt="Once", **sampling).choices[0].text
    assert served.client.completions.create(model=MODEL_NAME, prompt="Once", **sampling).choices[0].text == first
    assert cli_main(["generate", "--model", str(chat_model_dir), "--prompt", "Once", "--temperature", "1.0",
                     "--top_p", "0.9", "--seed", "7", "--max_new_tokens", "12"]) == 0
    assert capsys.readouterr().out == "Once" + first + "\n"
    other = served.client.completions.create(model=MODEL_NAME, prompt="Once", **{**sampling, "seed": 8})
    assert other.choices[0].text != first


# ---------------------------------------------------------------- bad requests

GOOD = {"messages": user("Add 3 and 4."), "max_tokens": 2}
LONG = "word " * CONTEXT

BAD_REQUESTS = [
    # (endpoint, body, status, param, code)
    ("chat", b'{"messages": [', 400, None, "invalid_json"),
    ("chat", b"\xff\xfe not utf-8", 400, None, "invalid_json"),
    ("chat", b'["an", "array"]', 400, None, "invalid_json"),
    ("chat", {}, 400, "messages", "missing_required_parameter"),
    ("chat", {"messages": []}, 400, "messages", "invalid_value"),
    ("chat", {"messages": "hello"}, 400, "messages", "invalid_value"),
    ("chat", {"messages": ["hello"]}, 400, "messages[0]", "invalid_type"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", "invalid_value"),
    ("chat", {"messages": user("hi") + [{"role": "tool", "content": "x"}]}, 400, "messages[1].role", "invalid_value"),
    ("chat", {"messages": [{"role": "user"}]}, 400, "messages[0].content", "invalid_type"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages[0].content", "invalid_value"),
    ("chat", {**GOOD, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("chat", {**GOOD, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
    ("chat", {**GOOD, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ("chat", {**GOOD, "max_tokens": 2.5}, 400, "max_tokens", "invalid_type"),
    ("chat", {**GOOD, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    ("chat", {**GOOD, "temperature": -0.1}, 400, "temperature", "invalid_value"),
    ("chat", {**GOOD, "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ("chat", json.dumps(GOOD)[:-1].encode() + b', "temperature": NaN}', 400, "temperature", "invalid_value"),
    ("chat", {**GOOD, "top_p": 1.5}, 400, "top_p", "invalid_value"),
    ("chat", {**GOOD, "stop": 5}, 400, "stop", "invalid_type"),
    ("chat", {**GOOD, "stop": ["a", 1]}, 400, "stop", "invalid_type"),
    ("chat", {**GOOD, "seed": "x"}, 400, "seed", "invalid_type"),
    ("chat", {**GOOD, "n": 2}, 400, "n", "invalid_value"),
    ("chat", {**GOOD, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("chat", {**GOOD, "stream": True, "stream_options": []}, 400, "stream_options", "invalid_type"),
    ("chat", {**GOOD, "model": "gpt-4"}, 404, "model", "model_not_found"),
    ("chat", {**GOOD, "model": 4}, 400, "model", "invalid_type"),
    ("chat", {"messages": user(LONG)}, 400, "messages", "context_length_exceeded"),
    ("chat", {"messages": user(LONG), "stream": True}, 400, "messages", "context_length_exceeded"),
    ("completions", {}, 400, "prompt", "missing_required_parameter"),
    ("completions", {"prompt": ["one", "two"]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": [5, 10**6]}, 400, "prompt", "invalid_value"),
    ("completions", {"prompt": LONG}, 400, "prompt", "context_length_exceeded"),
    ("completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("completions", b'{"prompt": "' + b"x" * (5 * 2**20) + b'"}', 413, None, "request_too_large"),
]


@pytest.mark.parametrize("endpoint, body, status, param, code", BAD_REQUESTS)
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(served, endpoint, body, status, param, code):
    path = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}[endpoint]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(served.url + path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"
    good = httpx.post(f"{served.url}/v1/chat/completions", json=GOOD)
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_openai_client_raises_on_error_bodies_and_unknown_routes_are_json(served):
    with pytest.raises(openai.BadRequestError) as bad:
        served.client.chat.completions.create(model=MODEL_NAME, messages=user("hi"), max_tokens=0)
    assert bad.value.code == "invalid_value" and bad.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as missing:
        served.client.chat.completions.create(model="gpt-4", messages=user("hi"))
    assert missing.value.code == "model_not_found"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, served.url + path)
        assert response.status_code == status and response.json()["error"]["message"]


# ---------------------------------------------------------------- batching, disconnects, the queue bound

def test_concurrent_requests_are_decoded_in_one_batch_with_their_solo_answers(served):
    """The first request is held inside its prefill until the other three wait in the queue; all
    four then decode together (the three join the first mid-reply), and each answer is the one it
    gets alone."""
    questions = list(CHATS)
    completion_prompt = served.tokenizer.apply_chat_template(user(questions[0]), tokenize=False,
                                                             add_generation_prompt=True)
    requests = [lambda q=q: served.client.chat.completions.create(model=MODEL_NAME, messages=user(q), temperature=0)
                .choices[0].message.content for q in questions]
    requests.append(lambda: served.client.completions.create(model=MODEL_NAME, prompt=completion_prompt,
                                                             temperature=0, stop=" town").choices[0].text)
    served.engine.stats["largest_batch"] = 0
    with served.gate.held(after=0), ThreadPoolExecutor(len(requests)) as pool:
        first = pool.submit(requests[0])
        wait_until(served.gate.blocked.is_set, "the first request's prefill")
        rest = [pool.submit(request) for request in requests[1:]]
        wait_until(lambda: health(served)["waiting"] == 3, "three requests waiting")
        served.gate.release()
        answers = [first.result()] + [future.result() for future in rest]
    assert answers == [CHATS[q] for q in questions] + ["Velwen is a quiet river"]
    assert health(served)["largest_batch"] == 4
    assert answers[3] == solo(served, served.tokenizer(completion_prompt)["input_ids"], stop_strings=[" town"]).texts[0]


def metric_samples(text):
    """Prometheus's text format -> {sample name with its labels: value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def request_counts(served):
    """minimind_requests_total's samples: {(endpoint, status): count}."""
    return {tuple(re.findall(r'="([^"]*)"', name)): value
            for name, value in metric_samples(httpx.get(served.url + "/metrics").text).items()
            if name.startswith("minimind_requests_total{")}


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(served, stream):
    before, counted = health(served), request_counts(served)
    body = {"messages": user("Say hello in French."), "temperature": 0, "max_tokens": 100, "stream": stream}
    with served.gate.held(after=3):  # prefill and two steps, then the engine waits inside the next step
        if stream:  # read the first text, then close the connection
            with httpx.Client() as client, client.stream("POST", f"{served.url}/v1/chat/completions",
                                                         json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break
        else:  # give up waiting for the whole reply, which cannot come while the engine is held
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=1))
        wait_until(lambda: health(served)["cancelled"] == before["cancelled"] + 1, "the server to see the disconnect")
    wait_until(lambda: health(served)["running"] == 0, "the row to leave the batch")
    assert health(served)["finished"] == before["finished"]  # it never ran to its end
    # logged and counted as the client's doing: 200 for a stream that had begun, 499 for a whole answer
    # never sent (it was counted as a server error, 500, before)
    endpoint = "/v1/chat/completions"
    wait_until(lambda: sum(request_counts(served).values()) == sum(counted.values()) + 1, "the request's metrics")
    status = "200" if stream else "499"
    assert request_counts(served)[endpoint, status] == counted.get((endpoint, status), 0) + 1
    assert served.client.chat.completions.create(model=MODEL_NAME, messages=user("Add 3 and 4."),
                                                 temperature=0).choices[0].message.content == CHATS["Add 3 and 4."]


def test_a_storm_of_mixed_clients_leaves_the_server_idle_and_answering(chat_model_dir):
    """Long and short prompts at once, streams left after their first text, whole answers given up on,
    streams read to the end and prompts over the context, in waves of 12: afterwards no request was a
    server error, nothing runs or waits, and a greedy question gets the answer it got before."""
    model, tokenizer = load_for_inference(str(chat_model_dir))
    engine = BatchingEngine(model, tokenizer, max_batch_size=4, max_queue=64, context_length=256, prefill_chunk=32)
    words = "the river town of Velwen lies in the north where quiet boats carry salt".split()

    def chat(url, content, stream, leave_after=None, read_timeout=60.0):
        body = {"model": MODEL_NAME, "messages": user(content), "max_tokens": 40, "stream": stream}
        try:
            with httpx.Client(timeout=httpx.Timeout(60, read=read_timeout)) as client:
                if not stream:
                    return client.post(f"{url}/v1/chat/completions", json=body).status_code
                with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
                    for events, _ in enumerate(response.iter_lines()):
                        if leave_after is not None and events >= leave_after:
                            return "left"
                    return response.status_code
        except httpx.ReadTimeout:
            return "gave up"

    with running_server(create_app(engine, MODEL_NAME)) as url:
        ask = dict(model=MODEL_NAME, messages=user("What is Velwen?"), temperature=0)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        before = client.chat.completions.create(**ask).choices[0].message.content
        kinds = [("short, left", lambda i: chat(url, " ".join(words[:3 + i % 5]), True, leave_after=2)),
                 ("long, left while read", lambda i: chat(url, " ".join(words * 8), True, leave_after=1)),
                 ("short, whole stream", lambda i: chat(url, " ".join(words[:4]), True)),
                 ("given up on", lambda i: chat(url, " ".join(words[:6]), False, read_timeout=0.05)),
                 ("over the context", lambda i: chat(url, " ".join(words * 40), False))]
        with ThreadPoolExecutor(12) as pool:
            outcomes = [future.result() for wave in range(3) for future in
                        [pool.submit(kinds[i % len(kinds)][1], i) for i in range(12 * wave, 12 * wave + 12)]]
        server = SimpleNamespace(url=url)  # as health and request_counts take it
        wait_until(lambda: (health(server)["running"], health(server)["waiting"]) == (0, 0), "the engine to be idle")
        counts = request_counts(server)
        after = client.chat.completions.create(**ask).choices[0].message.content
        status = health(server)
    assert before == after == CHATS["What is Velwen?"]
    assert status["status"] == "ok" and status["cancelled"] >= 1  # the rows of clients that left mid-answer
    assert {status for _, status in counts} <= {"200", "400", "499"}, counts  # no 500: nothing failed
    assert outcomes.count(400) == 7 and outcomes.count(200) >= 7  # over the context; whole streams
    assert outcomes.count("left") == 15


def test_a_full_queue_answers_503_and_the_server_recovers(served):
    with served.gate.held(after=0), ThreadPoolExecutor(4) as pool:
        ask = lambda: httpx.post(f"{served.url}/v1/chat/completions", timeout=60,  # noqa: E731
                                 json={"messages": user("Add 3 and 4."), "temperature": 0})
        running = pool.submit(ask)
        wait_until(served.gate.blocked.is_set, "the first request's prefill")
        waiting = [pool.submit(ask) for _ in range(3)]
        wait_until(lambda: health(served)["waiting"] == 3, "the queue to fill")
        refused = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": user("Add 3 and 4.")})
        served.gate.release()
        answered = [running.result()] + [future.result() for future in waiting]
    assert refused.status_code == 503 and refused.headers["retry-after"]
    error = refused.json()["error"]
    assert error["code"] == "queue_full" and "--max_queue" in error["message"]
    assert [r.json()["choices"][0]["message"]["content"] for r in answered] == [CHATS["Add 3 and 4."]] * 4
    assert (health(served)["running"], health(served)["waiting"]) == (0, 0)


def test_engine_rows_join_and_leave_yet_decode_as_alone(tokenizer):
    """Driven step by step: rows of different prompt lengths, limits, greedy or seeded sampling,
    joining a running batch at different times; each row's tokens equal generate() alone."""
    model = tiny_model(seed=1).eval()
    torch.manual_seed(2)
    prompts = [torch.randint(3, 6400, (n,)).tolist() for n in (5, 17, 2, 9, 30, 1)]
    settings = [SamplingSettings(max_new_tokens=20, temperature=0),
                SamplingSettings(max_new_tokens=7, temperature=0),
                SamplingSettings(max_new_tokens=25, temperature=0.9, top_p=0.8, seed=3),
                SamplingSettings(max_new_tokens=12, temperature=0, repetition_penalty=1.3),
                SamplingSettings(max_new_tokens=15, temperature=1.2, top_k=20, seed=4),
                SamplingSettings(max_new_tokens=9, temperature=0)]
    engine = BatchingEngine(model, tokenizer, max_batch_size=4, max_queue=8)
    jobs = {}

    def submit(i):
        jobs[i] = engine.submit(prompts[i], settings[i], lambda update: None)

    submit(0)
    engine.step()
    engine.step()
    submit(1)
    submit(2)
    engine.step()
    for i in (3, 4, 5):
        submit(i)
    cancelled = engine.submit(prompts[0], settings[0], lambda update: None)
    engine.cancel(cancelled)
    while engine.running or engine.waiting:
        engine.step()
    assert engine.stats["largest_batch"] == 4 and not cancelled.token_ids
    for i, job in jobs.items():
        p = settings[i]
        alone = generate(model, [prompts[i]], max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                         top_p=p.top_p, top_k=p.top_k, repetition_penalty=p.repetition_penalty, seed=p.seed,
                         tokenizer=tokenizer)
        assert job.token_ids == alone.token_ids[0], i
    assert engine.running == [] and engine.cache.lengths == [0] * 4


def test_engine_greedy_token_ids_equal_minimind_generate_alone_and_batched(chat_model_dir, tokenizer, capsys):
    """The trained replies, token for token: one request alone, then all joining one another."""
    model, _ = load_for_inference(str(chat_model_dir))
    engine = BatchingEngine(model, tokenizer)
    prompts = [encode_chat(tokenizer, user(question)) for question in CHATS]
    expected = [generate(model, [ids], max_new_tokens=64, tokenizer=tokenizer).token_ids[0] for ids in prompts]
    alone = engine.submit(prompts[0], SamplingSettings(max_new_tokens=64, temperature=0), lambda update: None)
    while engine.running or engine.waiting:
        engine.step()
    jobs = []
    for ids in prompts:  # each joins the batch one step after the previous one
        jobs.append(engine.submit(ids, SamplingSettings(max_new_tokens=64, temperature=0), lambda update: None))
        engine.step()
    while engine.running or engine.waiting:
        engine.step()
    assert alone.token_ids == expected[0] and [job.token_ids for job in jobs] == expected
    assert engine.stats["largest_batch"] == 3
    assert tokenizer.decode(expected[1]) == CHATS["Add 3 and 4."]


def test_decoding_tries_both_thread_counts_and_a_prompt_uses_all(tokenizer):
    """The server's thread policy on a CPU: a decoding step, of one row or several, tries every thread
    and few_threads before it keeps the faster; a prompt, alone or read while another reply streams
    (after a step on few_threads; then in one pass with that step), every thread the engine was made
    with. Tokens as generate's."""
    model = tiny_model(seed=1).eval()
    prompts = [[5, 9, 200, 31], [7, 7, 1000]]
    settings = SamplingSettings(max_new_tokens=6, temperature=0)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        engine = BatchingEngine(model, tokenizer, max_batch_size=2, few_threads=1)
        seen = []
        for name, rows_of in (("prefill", lambda args: len(args[1])), ("step", lambda args: sum(args[2])),
                              ("step_and_prefill", lambda args: len(args[3]))):
            def counted(*args, _pass=getattr(engine.model, name), _name=name, _rows=rows_of, **kwargs):
                seen.append((_name, _rows(args), torch.get_num_threads()))
                return _pass(*args, **kwargs)
            setattr(engine.model, name, counted)
        first = engine.submit(prompts[0], settings, lambda update: None)
        for _ in range(3):
            engine.step()  # the first row decodes alone
        second = engine.submit(prompts[1], settings, lambda update: None)
        while engine.running or engine.waiting:
            engine.step()
    finally:
        torch.set_num_threads(before)
    # the first prompt alone; the second while the first row decodes: in one pass with its step
    assert [(name, rows, threads) for name, rows, threads in seen if "prefill" in name] == [
        ("prefill", 1, 3), ("step_and_prefill", 1, 3)]
    one_row = [threads for name, rows, threads in seen if name == "step" and rows == 1]
    assert one_row[:4] == [3, 3, 1, 1]  # warm-up and one measured step of each count (ThreadPolicy)
    assert ("step", 2, 3) in seen
    for job, ids in zip((first, second), prompts):
        assert job.token_ids == generate(model, [ids], max_new_tokens=6, tokenizer=tokenizer).token_ids[0]


def test_an_engine_stepping_in_the_callers_thread_ends_its_requests_when_it_stops(tokenizer):
    """serve_forever (the serve command runs it in its main thread): it answers what is submitted,
    returns when keep_going() turns false, fails what is still there, and refuses requests after."""
    engine = BatchingEngine(tiny_model(seed=1).eval(), tokenizer, max_batch_size=2)
    settings = SamplingSettings(max_new_tokens=4, temperature=0)
    updates, last = [], []
    answered = engine.submit([5, 9, 200], settings, updates.append)
    steps = iter(range(1000))
    engine.serve_forever(keep_going=lambda: next(steps) < 1)  # idle after the first request: it stops
    assert answered.finish_reason == "length" and updates[-1].finish_reason == "length"
    assert not engine.alive
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([5, 9], settings, last.append)
    engine2 = BatchingEngine(tiny_model(seed=1).eval(), tokenizer, max_batch_size=2)
    waiting = engine2.submit([5, 9, 200], settings, last.append)
    engine2.stop()  # stopped before it ever stepped: what waits is told
    engine2.serve_forever()
    assert waiting.finish_reason == "error" and last[-1].error == "the server is shutting down"


def test_thread_policy_keeps_the_faster_count_for_each_number_of_rows_and_notices_a_change():
    """Decoding steps: after a warm-up and a measured step of each count, the faster count (per number
    of rows), the other every `explore`-th step, or rarer when it is much slower; when the costs swap,
    so does the choice."""
    now = [0.0]
    cost = {1: 1.1, 4: 1.0}
    policy = ThreadPolicy(1, 4, explore=8, clock=lambda: now[0])
    before = torch.get_num_threads()

    def run():
        now[0] += cost[torch.get_num_threads()] * rows[0]

    rows = [3]

    def counts(steps, number_of_rows=3):
        rows[0] = number_of_rows
        used = []
        for _ in range(steps):
            policy.timed(number_of_rows, run)
            used.append(torch.get_num_threads())
        return used

    try:
        assert counts(4) == [4, 4, 1, 1]  # warm-up and one measured step of each
        assert counts(4, number_of_rows=1) == [4, 4, 1, 1]  # one row is timed on its own
        used = counts(40)
        assert used.count(1) == 5 and used.count(4) == 35  # the slower count every 8th step
        cost[1], cost[4] = 0.5, 3.0  # the load changed: now one thread is faster (6x)
        used = counts(80)
        assert used[-8:].count(1) == 8
        counts(250)  # 4 threads' average catches up with what they cost now, a step each time they are tried
        used = counts(250)  # trying 4 threads costs 5 steps' worth: once in 250 steps (2% of the time)
        assert 1 <= used.count(4) <= 2
        assert sum(policy.steps.values()) == 4 + 4 + 40 + 80 + 500  # what /health reports
    finally:
        torch.set_num_threads(before)


def test_replies_stop_at_the_context_and_the_cache_stays_within_it(tokenizer):
    model = tiny_model().eval()
    engine = BatchingEngine(model, tokenizer, context_length=100)
    long = engine.submit([5] * 30, SamplingSettings(max_new_tokens=1000, temperature=0), lambda update: None)
    engine.step()
    short = engine.submit([6] * 90, SamplingSettings(max_new_tokens=1000, temperature=0), lambda update: None)
    while engine.running or engine.waiting:
        engine.step()
    assert (len(long.token_ids), long.finish_reason) == (70, "length")
    assert (len(short.token_ids), short.finish_reason) == (10, "length")
    assert engine.cache.capacity == 100
    with pytest.raises(ValueError, match="the prompt has 100 tokens; the context holds 100"):
        engine.submit([5] * 100, SamplingSettings(), lambda update: None)


def test_a_failing_prefill_fails_its_request_only(tokenizer):
    model = tiny_model(seed=1).eval()
    poison = 4

    class Poisoned(PreparedModel):
        """A model whose passes over the poisoned prompt fail: alone, and with the decoding rows' step
        (which the engine then runs apart from it)."""
        mixed = 0

        def prefill(self, cache, rows, input_ids, **kwargs):
            if bool((input_ids == poison).any()):
                raise RuntimeError("poisoned prompt")
            return super().prefill(cache, rows, input_ids, **kwargs)

        def step_and_prefill(self, cache, tokens, active, rows, input_ids, **kwargs):
            self.mixed += 1
            if bool((input_ids == poison).any()):
                raise RuntimeError("poisoned prompt")
            return super().step_and_prefill(cache, tokens, active, rows, input_ids, **kwargs)

    engine = BatchingEngine(Poisoned(model), tokenizer)
    healthy, updates = [10, 11, 12], []
    job = engine.submit(healthy, SamplingSettings(max_new_tokens=8, temperature=0), lambda update: None)
    engine.step()
    failed = engine.submit([poison, 5], SamplingSettings(max_new_tokens=8), updates.append)
    while engine.running or engine.waiting:
        engine.step()
    assert updates[-1].error == "generation failed: RuntimeError: poisoned prompt" and failed.finish_reason == "error"
    assert job.token_ids == generate(model, [healthy], max_new_tokens=8, tokenizer=tokenizer).token_ids[0]
    assert engine.model.mixed == 1


def test_chunked_prefill_of_a_long_prompt_lets_a_short_request_through(tokenizer):
    """A prompt read in chunks of a few tokens a step: a short request sent after its first chunk gets
    its first token (and its whole reply) before the long prompt is in, and both replies are the
    tokens generate() gives each alone."""
    model = tiny_model(seed=4).eval()
    engine = BatchingEngine(model, tokenizer, max_batch_size=4, context_length=200, prefill_chunk=16)
    torch.manual_seed(5)
    long_prompt, short_prompt = torch.randint(3, 6400, (150,)).tolist(), [7, 8, 9]
    greedy = SamplingSettings(max_new_tokens=6, temperature=0)
    long = engine.submit(long_prompt, greedy, lambda update: None)
    engine.step()
    assert 0 < long.prefilled < len(long_prompt)
    short = engine.submit(short_prompt, greedy, lambda update: None)
    steps = 0
    while not short.done:
        engine.step()
        steps += 1
    assert long.prefilled < len(long_prompt) and not long.token_ids  # still reading
    while engine.running:
        engine.step()
    # its first step: the whole prompt in, the first token from it, the second from that step's decoding
    assert steps == greedy.max_new_tokens - 1
    for job, prompt in ((long, long_prompt), (short, short_prompt)):
        assert job.token_ids == generate(model, [prompt], max_new_tokens=6, tokenizer=tokenizer).token_ids[0]


def test_a_grown_cache_is_read_only_where_written_or_zeroed(tokenizer, monkeypatch):
    """The cache grows past its first 256 columns twice while a long prompt is read in chunks and
    short rows of other lengths decode beside it, and again while the long one decodes with them;
    grown memory is filled with NaN here (the allocator's memory may hold anything), so a column read
    before it was written or zeroed would change the tokens. Each reply is generate()'s alone."""
    monkeypatch.setattr(SlotCache, "untouched_fill", float("nan"))
    model = tiny_model(seed=6, context=1200).eval()
    engine = BatchingEngine(model, tokenizer, max_batch_size=4, prefill_chunk=64)
    torch.manual_seed(7)
    prompts = [torch.randint(3, 6400, (n,)).tolist() for n in (600, 5, 40, 300)]
    greedy = [SamplingSettings(max_new_tokens=n, temperature=0) for n in (30, 40, 20, 30)]
    jobs = [engine.submit(prompts[0], greedy[0], lambda update: None)]
    engine.step()
    jobs += [engine.submit(prompts[i], greedy[i], lambda update: None) for i in (1, 2)]
    for _ in range(4):
        engine.step()
    jobs.append(engine.submit(prompts[3], greedy[3], lambda update: None))
    while engine.running:
        engine.step()
    assert engine.cache.capacity == 1024 and engine.stats["largest_batch"] == 4
    for job, prompt, settings in zip(jobs, prompts, greedy):
        alone = generate(model, [prompt], max_new_tokens=settings.max_new_tokens, tokenizer=tokenizer)
        assert job.token_ids == alone.token_ids[0], len(prompt)


def test_max_model_len_defaults_to_the_trained_context(tmp_path, tokenizer):
    model = tiny_model()
    model.config.max_seq_len = 96  # what training writes into config.json
    model.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    loaded, _ = load_for_inference(str(tmp_path / "trained"))
    assert trained_context(loaded.config) == 96
    tiny_model().save_pretrained(tmp_path / "other")  # from elsewhere: nothing recorded
    assert trained_context(load_for_inference(str(tmp_path / "other"), tokenizer=None)[0].config) == CONTEXT


@pytest.fixture(scope="module")
def keyed(chat_model_dir):
    """A second server over the same model, started with an API key."""
    model, tokenizer = load_for_inference(str(chat_model_dir))
    engine = BatchingEngine(model, tokenizer, max_batch_size=2)
    with running_server(create_app(engine, MODEL_NAME, api_key="s3cret")) as url:
        yield url


def test_api_key_accepted_missing_and_wrong(keyed):
    good = openai.OpenAI(base_url=f"{keyed}/v1", api_key="s3cret", max_retries=0)
    reply = good.chat.completions.create(model=MODEL_NAME, messages=user("Add 3 and 4."), temperature=0)
    assert reply.choices[0].message.content == CHATS["Add 3 and 4."]
    assert [m.id for m in good.models.list()] == [MODEL_NAME]
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=f"{keyed}/v1", api_key="guess", max_retries=0).models.list()
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    for path, method, body in (("/v1/chat/completions", "POST", {"messages": user("hi")}),
                               ("/v1/completions", "POST", {"prompt": "hi"}), ("/v1/models", "GET", None),
                               (f"/v1/models/{MODEL_NAME}", "GET", None)):
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret-not"}):
            response = httpx.request(method, keyed + path, json=body, headers=headers)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer", (path, headers)
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
            assert error["code"] == ("invalid_api_key" if headers.get("Authorization", "").startswith("Bearer s")
                                     else None)
    # the page, the health check and the metrics need no key
    assert [httpx.get(keyed + path).status_code for path in ("/", "/health", "/metrics")] == [200, 200, 200]


def test_metrics_endpoint_in_prometheus_text_format(served):
    reply = served.client.chat.completions.create(model=MODEL_NAME, messages=user("Add 3 and 4."), temperature=0)
    response = httpx.get(served.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("minimind_requests_total", "minimind_prompt_tokens_total", "minimind_completion_tokens_total",
                 "minimind_queue_length", "minimind_running_requests", "minimind_prefill_tokens_total",
                 "minimind_batch_size_bucket", "minimind_engine_step_seconds_bucket",
                 "minimind_time_to_first_token_seconds_bucket", "minimind_request_duration_seconds_bucket"):
        assert f"\n{name}" in text, name
    samples = metric_samples(text)
    assert samples['minimind_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert samples["minimind_completion_tokens_total"] >= reply.usage.completion_tokens
    assert samples["minimind_queue_length"] == 0


# ---------------------------------------------------------------- the command

def test_serve_command_starts_answers_and_refuses_bad_flags(chat_model_dir, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert all(flag in help_text for flag in ("--model", "--device", "--dtype", "--port", "--max_queue"))
    assert cli_main(["serve", "--model", str(chat_model_dir), "--max_batch_size", "0"]) == 2
    assert "--max_batch_size" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--model", str(chat_model_dir), "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    # The command as a user runs it, in a thread of this process (a second Python would spend most
    # of its time importing torch); uvicorn.Server is wrapped only to reach the server and stop it.
    servers = []

    class Server(uvicorn.Server):
        def __init__(self, config):
            super().__init__(config)
            servers.append(self)

    monkeypatch.setattr(uvicorn, "Server", Server)
    command = threading.Thread(target=cli_main, args=(["serve", "--model", str(chat_model_dir), "--port", str(port),
                                                        "--served_model_name", "velwen", "--max_model_len", "64",
                                                        "--host", "0.0.0.0"],))
    command.start()
    try:
        wait_until(lambda: servers and servers[0].started, "minimind serve to start", timeout=120)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model="velwen", messages=user("Add 3 and 4."), temperature=0)
        assert reply.choices[0].message.content == CHATS["Add 3 and 4."]
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64") as refused:
            client.completions.create(model="velwen", prompt="word " * 70)
        assert refused.value.code == "context_length_exceeded"
        assert client.models.retrieve("velwen").model_extra["max_model_len"] == 64
        assert httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok"
    finally:
        if servers:
            servers[0].should_exit = True  # the engine, in the command's thread, stops when the server has
        command.join(timeout=60)
    assert not command.is_alive()
    err = capsys.readouterr().err
    threads = torch.get_num_threads()  # the engine tries one thread fewer; put back afterwards
    words = f", {threads - 1} or {threads} CPU threads, whichever decodes faster"
    assert f"serving 'velwen' (context 64 tokens{words if threads > 1 else ''})" in err
    assert "warning: listening on 0.0.0.0 without an API key" in err
    assert re.search(r"request 200 POST /v1/chat/completions prompt=\d+ completion=\d+ first_token=[\d.]+s "
                     r"total=[\d.]+s", err)


class ClosingUvicorn:
    """Stands in for uvicorn.Server in serve_beside_engine: runs until told to exit, then closes
    (waits on its connections) for `closing` seconds."""
    started, should_exit, closed = True, False, False

    def __init__(self, closing=60):
        self.closing = closing

    def run(self):
        while not self.should_exit:
            time.sleep(0.01)
        time.sleep(self.closing)
        self.closed = True


@contextmanager
def sigterm_counted():
    """SIGTERM's handler while the block runs counts the signals that reach it."""
    reached = []
    previous = signal.signal(signal.SIGTERM, lambda number, frame: reached.append(number))
    try:
        yield reached
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_second_signal_while_uvicorn_closes_ends_the_wait_not_the_process():
    """After the first SIGTERM the replies finished and uvicorn is closing (waiting on a connection
    that stays open): a second SIGTERM makes serve_beside_engine return (the process then exits,
    uvicorn's thread with it); it does not reach the handler that was there before (by default it
    kills the process: status -15)."""
    from minimind.commands.serve import serve_beside_engine

    class Engine:
        closing = stopping = False

        def serve_forever(self, keep_going):
            while not self.closing:
                time.sleep(0.01)

    def signal_twice():
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # the first: stop taking requests (to the process, as kill sends it)
        time.sleep(0.5)  # the engine is done, uvicorn is closing
        os.kill(os.getpid(), signal.SIGTERM)

    uvicorn_server = ClosingUvicorn()
    with sigterm_counted() as reached:
        threading.Thread(target=signal_twice, daemon=True).start()
        assert serve_beside_engine(uvicorn_server, Engine())
    assert reached == []  # neither signal got past serve_beside_engine's handler
    assert not uvicorn_server.closed  # it did not wait for uvicorn's 60 s


def test_signals_while_an_update_is_handed_over_do_not_cut_it_short(tokenizer):
    """Both SIGTERMs arrive while the engine's thread is inside a request's update callback (as
    the server's is, between queuing an update and waking the event loop). The callback finishes
    every time: a signal never raises into the engine's thread (a KeyboardInterrupt there once
    left a stream waiting for the update that ends it). The first signal lets the reply go on, the
    second ends it after that step with "the server is shutting down", and later requests are
    refused."""
    from minimind.commands.serve import serve_beside_engine

    engine = BatchingEngine(tiny_model(seed=3, context=4096).eval(), tokenizer, max_batch_size=2, context_length=4096)
    heard, sent = [], []

    def on_update(update):
        if len(heard) in (2, 5):  # the first signal during the 3rd update, the second during the 6th
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(len(heard))
        heard.append(update)

    engine.submit([5, 6, 7], SamplingSettings(max_new_tokens=3000, temperature=0), on_update)
    with sigterm_counted() as reached:
        assert serve_beside_engine(ClosingUvicorn(closing=0), engine)
    assert reached == [] and sent == [2, 5]
    assert len(heard) == 7  # the 6th update (the second signal's) arrived, then the step ended
    assert [update.error for update in heard] == [None] * 6 + ["the server is shutting down"]
    assert all(update.text for update in heard[:6]) and heard[5].completion_tokens == 6
    with pytest.raises(QueueFull, match="shutting down"):
        engine.submit([5], SamplingSettings(max_new_tokens=3), on_update)


@pytest.mark.long  # two server processes, ~7 s each on 2 cores
@pytest.mark.parametrize("signals", [1, 2])
def test_sigterm_lets_the_reply_in_flight_finish_and_a_second_one_ends_it(tmp_path, tokenizer, signals):
    """`minimind serve` as a process (its engine in the main thread): after one SIGTERM the streaming
    reply goes on to its last token; after a second it ends at once with "the server is shutting
    down". Either way the process exits with status 0."""
    folder = tmp_path / "model"
    # greedy and random: no early end of text; a context of 4096 lets the reply run past both signals
    tiny_model(seed=3, context=4096).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "minimind.commands.main", "serve", "--model", str(folder),
                                "--port", str(port), "--max_model_len", "4096"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return process.poll() is not None

    try:
        wait_until(healthy, "minimind serve to start", timeout=120)
        assert process.poll() is None, process.stderr.read()
        events, after_signal = [], 0
        body = {"model": str(folder), "prompt": "word", "max_tokens": 3000, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 1:
                    for _ in range(signals):
                        process.send_signal(signal.SIGTERM)
                        time.sleep(0.2)
                elif "choices" in events[-1]:
                    after_signal += len(events[-1]["choices"][0]["text"])  # characters (events come in pieces)
        status = process.wait(timeout=60)
    finally:
        process.kill()
    assert status == 0
    if signals == 1:
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert after_signal > 0  # it went on after the signal, to max_tokens ("length")
    else:
        assert events[-1]["error"]["message"] == "the server is shutting down"


# ---------------------------------------------------------------- the chat page, in a real browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser_page():
    if not CHROMIUM.exists():
        pytest.skip(f"the chat page is tested in a real browser and {CHROMIUM} is missing "
                    f"(Debian: apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page()
        finally:
            browser.close()


def test_chat_page_streams_stops_and_keeps_the_conversation(served, browser_page):
    page = browser_page
    page.set_default_timeout(30_000)
    page.goto(served.url + "/")
    page.wait_for_function("document.getElementById('model').textContent === %r" % MODEL_NAME)
    page.fill("#temperature", "0")

    # A reply streams in: the engine is held after its third token, so the text is on the page while
    # the reply is unfinished; Stop ends it, and the server frees the row.
    before = health(served)
    with served.gate.held(after=3):
        page.fill("#prompt", "Say hello in French.")
        page.press("#prompt", "Enter")
        page.wait_for_function("document.querySelector('.message.assistant').textContent.length > 0")
        assert page.is_enabled("#stop") and page.is_disabled("#send")  # text shown, reply unfinished
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('stopped')")
        wait_until(lambda: health(served)["cancelled"] == before["cancelled"] + 1, "the server to see the stop")
    wait_until(lambda: health(served)["running"] == 0, "the row to leave the batch")
    shown, full = page.text_content(".message.assistant"), CHATS["Say hello in French."]
    assert shown and full.startswith(shown) and len(shown) < len(full) and page.is_enabled("#send")

    # A whole reply, with its speed shown.
    page.click("#new_chat")
    page.fill("#prompt", "What is Velwen?")
    page.press("#prompt", "Enter")
    page.wait_for_function("document.getElementById('status').textContent.includes('tok/s')")
    assert page.text_content(".message.assistant") == CHATS["What is Velwen?"]
    status = page.text_content("#status")
    tokens = len(solo(served, encode_chat(served.tokenizer, user("What is Velwen?"))).token_ids[0])
    assert re.match(rf"{tokens} tokens in [\d.]+ s: [\d.]+ tok/s", status) and "finish: stop" in status

    # The next turn sends the system prompt, the whole history and the settings.
    page.fill("#system", "You are a helpful assistant")
    page.fill("#max_tokens", "5")
    page.fill("#prompt", "Add 3 and 4.")
    with page.expect_request("**/v1/chat/completions") as request:
        page.press("#prompt", "Enter")
    sent = request.value.post_data_json
    assert sent["messages"] == [{"role": "system", "content": "You are a helpful assistant"},
                                *user("What is Velwen?"), {"role": "assistant", "content": CHATS["What is Velwen?"]},
                                *user("Add 3 and 4.")]
    assert (sent["temperature"], sent["max_tokens"], sent["stream"], sent["model"]) == (0, 5, True, MODEL_NAME)
    page.wait_for_function("document.querySelectorAll('.message.assistant').length === 2 && "
                           "document.getElementById('status').textContent.includes('tok/s')")
    assert len(page.query_selector_all(".message.user")) == 2
