"""The OpenAI wire format: request bodies checked field by field, and the JSON the server answers.

A bad field gets an ApiError naming it (`param`), saying what is wrong and what would be right,
in OpenAI's shape: {"error": {"message", "type", "param", "code"}}. Fields we do not use
(user, logit_bias, frequency_penalty ...) are ignored, as other OpenAI-compatible servers do.
`top_k` and `repetition_penalty` are accepted as extensions, with minimind generate's meanings.
"""
import math
import time
import uuid

from ..settings import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE, DEFAULT_TOP_P, SamplingSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """An error answered to the client: HTTP status and OpenAI's error body."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error", status_headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.status_headers = status_headers  # extra response headers (WWW-Authenticate for a 401)

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param, message, code="invalid_value"):
    return ApiError(400, f"{param}: {message}", param=param, code=code)


# ---------------------------------------------------------------- reading fields

def number(body, name, default, low=None, high=None, integer=False, low_open=False):
    """body[name] as a number in [low, high] (low excluded if low_open); default when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        if not (integer and isinstance(value, float) and value.is_integer()):
            raise invalid(name, f"must be {kind}, got {value!r}", code="invalid_type")
        value = int(value)
    if not math.isfinite(value):  # Python's json reads NaN and Infinity
        raise invalid(name, f"must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else f"between {low} and {high}"
        raise invalid(name, f"must be {bounds}, got {value!r}")
    return value


def flag(body, name, default=False):
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"must be true or false, got {value!r}", code="invalid_type")
    return value


def stop_strings(body):
    """`stop`: a string or a list of strings."""
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop", "must be a string or a list of strings", code="invalid_type")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
    return stops


def sampling_params(body):
    """The sampling fields shared by both endpoints. Absent ones take minimind generate's defaults."""
    max_tokens = number(body, "max_completion_tokens", None, low=1, integer=True)
    if max_tokens is None:
        max_tokens = number(body, "max_tokens", DEFAULT_MAX_NEW_TOKENS, low=1, integer=True)
    if number(body, "n", 1, low=1, integer=True) != 1:
        raise invalid("n", "only n=1 is supported (send several requests: they are batched together)")
    top_p = number(body, "top_p", DEFAULT_TOP_P, low=0, high=1)
    top_k = number(body, "top_k", 0, low=0, integer=True)
    if top_p == 0:  # OpenAI allows 0: only the most likely token remains
        top_p, top_k = 1.0, 1
    return SamplingSettings(
        max_new_tokens=max_tokens,
        temperature=number(body, "temperature", DEFAULT_TEMPERATURE, low=0, high=2),
        top_p=top_p, top_k=top_k,
        repetition_penalty=number(body, "repetition_penalty", 1.0, low=0, low_open=True),
        seed=number(body, "seed", None, integer=True),
        stop_strings=stop_strings(body),
    )


def streaming(body):
    """(stream, include_usage) from `stream` and `stream_options.include_usage`."""
    stream = flag(body, "stream")
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise invalid("stream_options", "must be an object such as {\"include_usage\": true}", code="invalid_type")
    return stream, flag(options, "include_usage")


def chat_messages(body):
    """`messages` -> [{"role", "content"}] for the chat template; text content only."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "must be a non-empty list of {\"role\", \"content\"} objects",
                      code="missing_required_parameter" if messages is None else "invalid_value")
    return [chat_message(message, f"messages[{i}]") for i, message in enumerate(messages)]


def chat_message(message, where):
    if not isinstance(message, dict):
        raise invalid(where, "must be an object with role and content", code="invalid_type")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise invalid(f"{where}.content", "only text parts ({\"type\": \"text\", \"text\": ...}) are supported")
        content = "\n".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise invalid(f"{where}.content", "must be a string or a list of text parts", code="invalid_type")
    return {"role": ROLES[role], "content": content}


def completion_prompt(body, tokenizer, vocab):
    """`prompt` of /v1/completions -> token ids: a string, a list of ids (below `vocab`), or a list
    of one of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                        for t in prompt):
        return prompt
    if prompt is None:
        raise invalid("prompt", "is required: a string (or a list of token ids)", code="missing_required_parameter")
    raise invalid("prompt", f"must be one string or one list of token ids (0 to {vocab - 1})")


def check_model(body, served_name):
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"must be a string, got {model!r}", code="invalid_type")
    if model is not None and model != served_name:
        raise ApiError(404, f"The model {model!r} does not exist; this server serves {served_name!r} "
                            f"(GET /v1/models lists it)", param="model", code="model_not_found")


def check_prompt_length(prompt_tokens, context_length, param):
    if prompt_tokens >= context_length:
        raise ApiError(400, f"This model's maximum context length is {context_length} tokens, and the prompt has "
                            f"{prompt_tokens} (room is needed for at least one new token); shorten the "
                            f"{param}", param=param, code="context_length_exceeded")


# ---------------------------------------------------------------- answers

def usage(prompt_tokens, completion_tokens):
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseFormat:
    """One response's JSON: the whole answer (`response`) or its server-sent events (`first_chunk`,
    `chunk`, `usage_chunk`), sharing one id. Subclasses say how a choice looks."""
    object_name = chunk_object = id_prefix = None

    def __init__(self, model_name, include_usage=False):
        self.id, self.created, self.model = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model_name
        self.include_usage = include_usage

    def _envelope(self, object_name, choices):
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}

    def chunk(self, text, finish_reason=None):
        chunk = self._envelope(self.chunk_object, [self.chunk_choice(text, finish_reason)])
        if self.include_usage:  # OpenAI sends usage: null in every chunk but the last
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, prompt_tokens, completion_tokens):
        return {**self._envelope(self.chunk_object, []), "usage": usage(prompt_tokens, completion_tokens)}

    def response(self, text, finish_reason, prompt_tokens, completion_tokens):
        return {**self._envelope(self.object_name, [self.final_choice(text, finish_reason)]),
                "usage": usage(prompt_tokens, completion_tokens)}


class ChatFormat(ResponseFormat):
    """/v1/chat/completions: a chat.completion, or chat.completion.chunk events whose deltas add up
    to the message (the first one carries the role)."""
    object_name, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def first_chunk(self):
        chunk = self.chunk("")
        chunk["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return chunk

    def chunk_choice(self, text, finish_reason):
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}

    def final_choice(self, text, finish_reason):
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}


class CompletionFormat(ResponseFormat):
    """/v1/completions: a text_completion, or text_completion events. `echo_text` (the prompt, when
    the request asks for echo) comes before the generated text."""
    object_name = chunk_object = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, model_name, include_usage=False, echo_text=""):
        super().__init__(model_name, include_usage)
        self.echo_text = echo_text

    def first_chunk(self):
        return self.chunk(self.echo_text) if self.echo_text else None

    def chunk_choice(self, text, finish_reason):
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def final_choice(self, text, finish_reason):
        return self.chunk_choice(self.echo_text + text, finish_reason)
