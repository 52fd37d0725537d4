"""Conversations through the chat template: the text a model is trained on or prompted with, and
which of its tokens are trained (the assistant's turns).

SFT and DPO samples are rendered with the tokenizer's own chat template and labelled on the
assistant tokens only (`encode_trained`: ids and which of them are trained); a chat prompt for generation ends with the
assistant header (`encode_chat`).
"""
import bisect

import numpy as np

from ..errors import UserError
from ..model.labels import IGNORE_INDEX

ASSISTANT_HEADER, TURN_END = "<|im_start|>assistant\n", "<|im_end|>"
CHATML_ONLY = ("the tokenizer's chat template does not render assistant turns as <|im_start|>assistant\\n...<|im_end|>, "
               "each after the text of the messages before it; use a ChatML template")


def render_conversation(tokenizer, messages, tools=None, **options):
    """A conversation's text through the tokenizer's own chat template; `tools` (function definitions)
    are passed only when there are some, as the template's `tools` variable."""
    if tools:
        options["tools"] = tools
    return tokenizer.apply_chat_template(messages, tokenize=False, **options)


def assistant_spans(tokenizer, messages, tools, text, first=0):
    """[(start, end)] in `text` of what is trained in each assistant message from index `first` on:
    everything after its `<|im_start|>assistant\\n` header through its closing <|im_end|>, so thinking,
    content and tool calls, in whatever layout the template gives them; never a tool result, which
    belongs to another message. Found by scanning for the turns when that is unambiguous (fast),
    else by rendering the conversation cut around each turn (exact)."""
    spans = spans_by_scanning(messages, text)
    if spans is None:
        spans = spans_by_rendering(tokenizer, messages, tools, text)
    assistants = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    return [span for index, span in zip(assistants, spans) if index >= first]


def trained_part(text, start, end):
    """(start, end) of a turn text[start:end] without its header and what follows its last <|im_end|>."""
    turn = text[start:end]
    if not turn.startswith(ASSISTANT_HEADER) or TURN_END not in turn:
        raise UserError(CHATML_ONLY)
    return start + len(ASSISTANT_HEADER), start + turn.rindex(TURN_END) + len(TURN_END)


def spans_by_rendering(tokenizer, messages, tools, text):
    """Each assistant turn is what lies between the renderings of the conversation cut before it
    and cut after it (both prefixes of `text`): no assumption about the layout inside a turn."""
    ends = {len(messages): len(text)}

    def end_of(count):  # where the rendering of the first `count` messages ends in `text`
        if count not in ends:
            prefix = render_conversation(tokenizer, messages[:count], tools)
            if not text.startswith(prefix):
                raise UserError(CHATML_ONLY)
            ends[count] = len(prefix)
        return ends[count]

    return [trained_part(text, end_of(index) if index else text.find(ASSISTANT_HEADER), end_of(index + 1))
            for index, message in enumerate(messages) if message["role"] == "assistant"]


def spans_by_scanning(messages, text):
    """The turns `<|im_start|>assistant\\n ... <|im_end|>` found in `text`, one per assistant message in
    order, each holding its message's content, thinking and tool names; None when they do not
    match that way (a literal header or <|im_end|> inside a message, a template that rewrites
    content), and spans_by_rendering decides. It saves the 2 extra renderings per turn."""
    assistants = [message for message in messages if message["role"] == "assistant"]
    spans, cursor = [], 0
    for message in assistants:
        start = text.find(ASSISTANT_HEADER, cursor)
        end = text.find(TURN_END, start + len(ASSISTANT_HEADER)) + len(TURN_END) if start >= 0 else -1
        if start < 0 or end < len(TURN_END):
            return None
        turn = text[start + len(ASSISTANT_HEADER):end]
        parts = [message["content"], message.get("reasoning_content", "")]
        parts += [call["function"]["name"] for call in message.get("tool_calls", [])]
        if not all(part.strip() in turn for part in parts):
            return None
        spans.append((start + len(ASSISTANT_HEADER), end))
        cursor = end
    if text.find(ASSISTANT_HEADER, cursor) >= 0:
        return None
    return spans


def check_nothing_dropped(messages, tools, text):
    """Tools, tool calls, tool results and thinking must reach the text: a template without them
    (MiniMind2's) would train on conversations silently missing their most important part."""
    def tool_name(tool):
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        return str(function.get("name") or "")

    rendered = {
        "tool definitions": [tool_name(tool) for tool in tools],
        "tool calls": [call["function"]["name"] for message in messages for call in message.get("tool_calls", [])],
        "tool results": [message["content"] for message in messages if message["role"] == "tool"],
        "reasoning_content": [message.get("reasoning_content", "").strip("\n") for message in messages],
    }
    missing = [what for what, parts in rendered.items() if any(part not in text for part in parts)]
    if missing:
        raise UserError(f"the tokenizer's chat template does not render {', '.join(missing)}: training would silently "
                        f"drop them; use a tokenizer whose template does, such as MiniMind-3's (--tokenizer DIR)")


def encode_trained(tokenizer, conversations, train_from=None, tools=None):
    """Render each conversation with the chat template and tokenize it; mark the assistant turns.

    A trained span is what an assistant message renders to after its `<|im_start|>assistant\\n`
    header, through its closing <|im_end|>: thinking (`reasoning_content`), content and tool calls.
    The header, system, user and tool turns, and the newline after <|im_end|> are not trained.
    train_from[i] (optional) trains only messages from that index on (DPO: the responses, not
    assistant turns inside the prompt). tools[i] (optional): conversation i's tool definitions.
    Returns (ids, trained) per conversation: a list of token ids and a uint8 array, 1 where trained.
    """
    texts, spans = [], []
    for number, messages in enumerate(conversations):
        conversation_tools = tools[number] if tools else None
        text = render_conversation(tokenizer, messages, conversation_tools)
        check_nothing_dropped(messages, conversation_tools or [], text)
        texts.append(text)
        spans.append(assistant_spans(tokenizer, messages, conversation_tools, text,
                                     train_from[number] if train_from else 0))
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    return [(encoding.ids, trained_tokens(encoding, trained)) for encoding, trained in zip(encodings, spans)]


def encode_conversations(tokenizer, conversations, train_from=None, tools=None):
    """(ids, labels) lists of conversations (conversations.encode_trained), IGNORE_INDEX where not trained:
    for a few conversations held in memory (`minimind eval`); training reads them from the cache."""
    return [(ids, np.where(trained == 1, np.asarray(ids, dtype=np.int64), IGNORE_INDEX).tolist())
            for ids, trained in encode_trained(tokenizer, conversations, train_from, tools)]


def trained_tokens(encoding, spans):
    """1 for each token whose characters lie wholly inside one of `spans` (character ranges), else 0.

    Token offsets rise with the position, so the tokens inside a span are one run, found by two
    binary searches: the first token starting at or after the span's start, the first ending after
    its end. This asks the tokenizer for a few dozen offsets instead of building all of them."""
    count = len(encoding.ids)
    trained = np.zeros(count, dtype=np.uint8)
    positions = range(count)
    for start, end in spans:
        first = bisect.bisect_left(positions, start, key=lambda i: encoding.token_to_chars(i)[0])
        stop = bisect.bisect_right(positions, end, lo=first, key=lambda i: encoding.token_to_chars(i)[1])
        trained[first:stop] = 1
    return trained


def encode_chat(tokenizer, messages, open_thinking=False):
    """Messages -> prompt ids through the tokenizer's chat template, ending with the assistant header.
    open_thinking: MiniMind-3's template then ends the prompt inside an open <think> block, so the
    model reasons first (without it, that template closes an empty one); other templates ignore it."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         open_thinking=open_thinking)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
