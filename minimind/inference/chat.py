"""Chat in the terminal: a reply's thinking and tool calls shown apart from its answer
(`ReplyFormatter`), and a history that fits the context (`trim_history`).

MiniMind-3's replies may start with a <think>...</think> block and call tools with
<tool_call>{json}</tool_call>; `minimind chat` shows them as `thinking: ...` and
`tool call: name(arguments)` lines.
"""
import json

from ..data.conversations import encode_chat


def ends_inside_thinking(tokenizer, prompt_ids):
    """Whether a chat prompt leaves a <think> block open: the reply then starts with thinking."""
    text = tokenizer.decode(prompt_ids[-8:]).rstrip("\n")
    return text.endswith(THINK_OPEN)


# ---------------------------------------------------------------- showing thinking and tool calls

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
DIM, RESET = "\033[2m", "\033[0m"


def describe_tool_call(body):
    """'{"name": "f", "arguments": {"x": 1}}' -> 'tool call: f({"x": 1})'; other text as it is."""
    try:
        call = json.loads(body)
        name, arguments = call["name"], call.get("arguments", {})
    except (ValueError, KeyError, TypeError):
        return f"tool call: {body.strip()}"
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f"tool call: {name}({arguments})"


class ReplyFormatter:
    """A reply's text for display, fed piece by piece as it streams: thinking as `thinking: ...` (dimmed
    when `dim`) ending its line, each <tool_call>{json}</tool_call> as `tool call: name(arguments)` on a
    line of its own, the answer as it is. An empty think block shows nothing. A tail that could be
    the start of a tag is held back until the next piece tells; a tool call shows once complete.

    thinking: the reply starts inside a think block (the prompt opened it)."""

    def __init__(self, dim=False, thinking=False):
        self.dim, self.pending = dim, ""
        self.state = "thinking" if thinking else "answer"  # or "tool call", "after thinking"
        self.thought = False      # whether the current think block has shown text yet
        self.line_start = True    # whether the text shown so far ends a line

    def push(self, piece):
        self.pending += piece
        out = []
        while True:
            if self.state == "tool call":
                end = self.pending.find(CALL_CLOSE)
                if end < 0:
                    return "".join(out)
                out.append(self.emit(self.call_line(self.pending[:end])))
                self.pending, self.state = self.pending[end + len(CALL_CLOSE):], "answer"
                continue
            found = [(self.pending.find(tag), tag) for tag in (THINK_OPEN, THINK_CLOSE, CALL_OPEN) if tag in self.pending]
            if not found:
                break
            position, tag = min(found)
            before = self.pending[:position]
            out.append(self.emit(self.show(before.rstrip("\n") if tag == THINK_CLOSE else before)))
            self.pending = self.pending[position + len(tag):]
            out.append(self.emit(self.enter(tag)))
        tags = (THINK_OPEN, THINK_CLOSE, CALL_OPEN)
        keep = max((n for tag in tags for n in range(1, len(tag)) if self.pending.endswith(tag[:n])), default=0)
        shown = self.pending[:len(self.pending) - keep]
        if self.state == "thinking":  # newlines that may end the think block are held back too
            shown = shown.rstrip("\n")
        shown, self.pending = shown, self.pending[len(shown):]
        out.append(self.emit(self.show(shown)))
        return "".join(out)

    def finish(self):
        """The rest at the end of the reply (the text of an unclosed tool call or think block included)."""
        rest, self.pending = self.pending, ""
        if self.state == "tool call":
            self.state = "answer"
            return self.emit(self.call_line(rest))
        if self.state != "thinking":
            return self.emit(self.show(rest))
        return self.emit(self.show(rest.rstrip("\n"))) + self.emit(self.enter(THINK_CLOSE))

    def emit(self, text):
        if text:
            self.line_start = text.endswith("\n")
        return text

    def show(self, text):
        """Plain text in the current state."""
        if self.state == "after thinking":  # the template's blank line after </think>
            text = text.lstrip("\n")
            self.state = "answer" if text else self.state
        elif self.state == "thinking" and not self.thought:
            text = text.lstrip("\n")
            if text:
                self.thought = True
                text = (DIM if self.dim else "") + "thinking: " + text
        return text

    def enter(self, tag):
        """What a tag shows as it changes the state."""
        if tag == THINK_OPEN:
            self.state, self.thought = "thinking", False
        elif tag == THINK_CLOSE and self.state == "thinking":
            self.state = "after thinking"
            return (RESET if self.dim else "") + "\n" if self.thought else ""
        elif tag == CALL_OPEN:
            self.state = "tool call"
        return ""

    def call_line(self, body):
        return ("" if self.line_start else "\n") + describe_tool_call(body)


def trim_history(tokenizer, messages, max_tokens, open_thinking=False):
    """Drop the oldest turns (keeping a system message) until the rendered prompt fits max_tokens.

    Returns the kept messages and their prompt ids; the last user message is always kept (if it
    alone is too long, `decode` keeps its end)."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        ids = encode_chat(tokenizer, system + turns, open_thinking)
        if len(ids) <= max_tokens or len(turns) <= 1:
            return system + turns, ids
        turns = turns[2:] if len(turns) > 2 and turns[1]["role"] == "assistant" else turns[1:]
