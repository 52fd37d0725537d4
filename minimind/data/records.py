"""Data files in, normalized records out: one reader for every format, with clear errors.

Files: `.jsonl` (one JSON object a line), `.json` (an array of objects), `.txt` (plain text,
documents separated by blank lines), `.parquet` (needs pyarrow). Four record formats (FORMATS,
each recognised by its fields; the training stages say which ones they read, training/stages/):

    pretraining  {"text": "..."}                                        (or a .txt file)
    SFT          {"conversations": [{"role": "user", "content": "..."}, ...]}   (MiniMind)
                 {"messages": [...]}                                              (OpenAI style)
                 with tools: a "tools" list beside them (or on the system message, as MiniMind-3's
                 data has it), assistant "tool_calls" and "reasoning_content", "tool" messages
    DPO          {"chosen": [messages], "rejected": [messages]}                   (MiniMind)
                 {"prompt": "...", "chosen": "...", "rejected": "..."}
    GRPO         {"prompt": "..." or [messages], "answer": "...", ...any other fields}
                 {"conversations": [..., user, {"role": "assistant", "content": ""}]}   (MiniMind's
                 RL prompt sets: the last assistant turn left empty, no reference answer)

`read_records` normalizes them to

    pretraining  {"text": str}
    SFT          {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str}, ...],
                  "tools": [tool definitions]}   (tools only when given)
                 an assistant message may also hold "reasoning_content": str and
                 "tool_calls": [{"type": "function", "function": {"name": str, "arguments": str | dict}}]
    DPO          {"prompt_messages": [messages], "chosen": [assistant messages],
                  "rejected": [assistant messages]}
    GRPO         {"prompt_messages": [messages ending with a user turn], "answer": str (None when the
                  record has no reference answer), "fields": the record as written (reward functions
                  may read any field), "tools": [tool definitions] (only when given)}

A malformed record raises DataError naming the file, the line and the problem, or, with
skip_bad_records, is counted in a SkippedRecords (reason -> count, and the first locations) and
skipped. Turning records into token ids is datasets.py's work; the tokenizer trainer reads records too.

A new format is one RecordFormat entry in FORMATS (its fields, its normalize function) and a
dataset for it (datasets.DATASETS).
"""
import difflib
import glob
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import DataError, UserError

ROLES = ("system", "user", "assistant", "tool")
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
MAX_TXT_DOCUMENT_CHARS = 1_000_000


class BadRecord(Exception):
    """One record is malformed: `reason` is the short category counted by --skip_bad_records."""

    def __init__(self, reason, detail):
        self.reason, self.detail = reason, detail
        super().__init__(detail)


# ---------------------------------------------------------------- finding files

def expand_paths(data_args):
    """Files, folders or glob patterns -> a list of existing files, in the given order."""
    if isinstance(data_args, (str, Path)):
        data_args = [data_args]
    paths = []
    for argument in data_args:
        argument = str(argument)
        if any(char in argument for char in "*?["):
            matches = [Path(match) for match in sorted(glob.glob(argument, recursive=True))]
            if not any(match.is_file() for match in matches):
                raise UserError(f"no files match '{argument}'")
            paths += [match for match in matches if match.is_file()]
        elif Path(argument).is_dir():
            found = sorted(p for p in Path(argument).iterdir() if p.suffix in SUPPORTED_SUFFIXES)
            if not found:
                raise UserError(f"folder {argument} has no {', '.join(SUPPORTED_SUFFIXES)} files")
            paths += found
        elif Path(argument).is_file():
            paths.append(Path(argument))
        else:
            raise UserError(f"data file not found: {argument}")
    return paths


# ---------------------------------------------------------------- raw records from a file

def file_kind(path):
    """'jsonl', 'json', 'txt' or 'parquet', by suffix, else by the first non-blank byte."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".txt", ".parquet"):
        return suffix[1:]
    with open(path, "rb") as file:
        head = file.read(4096).lstrip()
    return {b"{": "jsonl", b"[": "json"}.get(head[:1], "txt")


def check_file(path):
    """File-level problems no record skipping can fix: missing, empty, binary."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with open(path, "rb") as file:
        head = file.read(8192)
    if not head.strip():
        raise DataError(path, None, "the file is empty")
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(path, None, "the file is UTF-16 encoded; save it as UTF-8")
    if b"\x00" in head and file_kind(path) != "parquet":
        raise DataError(path, None, "this looks like a binary file (it contains NUL bytes); "
                                    "expected UTF-8 text: .jsonl, .json or .txt")


def decode_line(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadRecord("invalid UTF-8", f"invalid UTF-8 (byte {raw[error.start]:#04x} at byte "
                                         f"{error.start + 1} of the line); save the file as UTF-8")


def parse_json(line):
    line = line.rstrip("\r\n")
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        where = "at the end of the line" if error.pos >= len(line) else f"at column {error.pos + 1}"
        raise BadRecord("invalid JSON", f"invalid JSON ({json_problem(error, where)})")


def json_problem(error, where):
    """'Unterminated string starting at column 10': Python's message names a place with a trailing
    "at" in some messages ("... starting at", "Invalid control character at"), not in others."""
    return f"{error.msg.removesuffix(' at')} {where}"


def jsonl_values(lines, first_line=1):
    """(line, object or BadRecord) for each non-blank line of `lines` (raw bytes each), numbered from
    first_line: a whole file, or a chunk of one that a preparation worker reads (data/prepare.py)."""
    for line_number, raw in enumerate(lines, first_line):
        try:
            line = decode_line(raw)
            if line.startswith("\ufeff") and line_number == 1:
                line = line[1:]
            if not line.strip():
                continue
            yield line_number, parse_json(line)
        except BadRecord as bad:
            yield line_number, bad


def raw_jsonl(path):
    """(line, object or BadRecord) for each non-blank line."""
    with open(path, "rb") as file:
        yield from jsonl_values(file)


def raw_json_array(path):
    """(line, object) for each element of a top-level JSON array; line is where it starts."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(path, None, f"invalid UTF-8 at byte {error.start + 1}; save the file as UTF-8")
    decoder = json.JSONDecoder()
    position = len(text) - len(text.lstrip())
    if text[position:position + 1] != "[":
        try:
            yield 1, json.loads(text)  # one pretty-printed object
        except json.JSONDecodeError:
            yield from raw_jsonl(path)  # or one object a line, despite the .json name
        return
    position += 1
    line = 1 + text.count("\n", 0, position)
    counted_to = position
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text):
            raise DataError(path, line, "invalid JSON (the array is not closed with ']')")
        if text[position] == "]":
            return
        line += text.count("\n", counted_to, position)
        counted_to = position
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            # Inside one array nothing after a syntax error can be trusted: stop here.
            raise DataError(path, error.lineno, f"invalid JSON ({json_problem(error, f'at column {error.colno}')})")
        yield line, value


def raw_txt(path):
    """({"text": document}) for each run of non-blank lines; line is where the document starts.

    A document longer than MAX_TXT_DOCUMENT_CHARS is cut at a line end, so a text without
    blank lines never has to fit in memory at once.
    """
    lines, start, size = [], None, 0
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, 1):
            try:
                line = decode_line(raw)
            except BadRecord as bad:
                yield line_number, bad
                continue
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            if line.strip():
                start = start or line_number
                lines.append(line)
                size += len(line)
            if lines and (not line.strip() or size > MAX_TXT_DOCUMENT_CHARS):
                yield start, {"text": "".join(lines).rstrip("\r\n")}
                lines, start, size = [], None, 0
    if lines:
        yield start, {"text": "".join(lines).rstrip("\r\n")}


def raw_parquet(path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"{path}: reading .parquet files needs pyarrow (pip install -e '.[parquet]'); "
                        f"or convert the file to .jsonl")
    row = 0
    for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=1024):
        for value in batch.to_pylist():
            row += 1
            yield row, value


# ---------------------------------------------------------------- normalizing records

def close_key(found, expected):
    """'; did you mean "conversations"?' for a misspelled field, else ''."""
    for key in found:
        match = difflib.get_close_matches(str(key), expected, n=1, cutoff=0.7)
        if match and key not in expected:
            return f'; did you mean "{match[0]}"?'
    return ""


def check_string(value, what, reason="non-string content"):
    """A str that UTF-8 can hold: JSON escapes can smuggle in lone surrogates such as \\ud800."""
    if not isinstance(value, str):
        raise BadRecord(reason, f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise BadRecord("invalid UTF-8", f"{what} holds an invalid character {value[error.start]!r} "
                                         f"(a lone surrogate escape)")
    return value


def json_value(value, what, kind):
    """A value that may come as JSON text (MiniMind-3's data stores tools and tool calls as strings)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise BadRecord("bad tool call", f"{what} is a string but not valid JSON "
                                             f"({json_problem(error, f'at column {error.colno}')})")
    if not isinstance(value, kind):
        raise BadRecord("bad tool call", f"{what} must be {'a list' if kind is list else 'an object'}, "
                                         f"got {type(value).__name__}")
    return value


def normalize_tool_call(call, what):
    """OpenAI's {"type": "function", "function": {"name", "arguments"}} (or the bare inner object):
    arguments stay as given, a JSON string or an object, because the chat template renders them so."""
    call = json_value(call, what, dict)
    function = call.get("function", call)
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise BadRecord("bad tool call", f'{what} has no function name (expected {{"type": "function", '
                                         f'"function": {{"name": ..., "arguments": ...}}}})')
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except json.JSONDecodeError:
            raise BadRecord("bad tool call", f'{what} ("{function["name"]}") arguments are not valid JSON')
    elif not isinstance(arguments, dict):
        raise BadRecord("bad tool call", f"{what} arguments must be a JSON object or a string of one, "
                                         f"got {type(arguments).__name__}")
    normalized = {"type": "function", "function": {"name": check_string(function["name"], f"{what} name"),
                                                   "arguments": arguments}}
    if "id" in call:
        normalized["id"] = call["id"]
    return normalized


def normalize_message(message, where):
    """One message -> {"role", "content"} plus, when given, an assistant's reasoning_content and
    tool_calls and a tool message's tool_call_id / name."""
    if not isinstance(message, dict):
        raise BadRecord("bad messages", f"{where} must be an object with role and content, "
                                        f"got {type(message).__name__}")
    if "role" not in message:
        raise BadRecord("missing field", f'{where} has no "role" field' + close_key(message, ["role", "content"]))
    role = message["role"]
    if role not in ROLES:
        raise BadRecord("wrong role", f"{where} has role {json.dumps(role, ensure_ascii=False)}; "
                                      f"expected one of {', '.join(ROLES)}")
    tool_calls = message.get("tool_calls")
    # An assistant message that only calls tools may have no content (OpenAI sends null).
    if "content" not in message and not (role == "assistant" and tool_calls):
        raise BadRecord("missing field", f'{where} has no "content" field' + close_key(message, ["role", "content"]))
    content = message.get("content")
    content = "" if content is None and tool_calls else check_string(content, f"{where} content")
    normalized = {"role": role, "content": content}
    for key in ("reasoning_content", "tool_calls"):
        if message.get(key) is not None and role != "assistant":
            raise BadRecord("bad tool call", f'{where} has "{key}", but only assistant messages carry it')
    if message.get("reasoning_content") is not None:
        normalized["reasoning_content"] = check_string(message["reasoning_content"], f"{where} reasoning_content")
    if tool_calls:
        calls = json_value(tool_calls, f"{where} tool_calls", list)
        normalized["tool_calls"] = [normalize_tool_call(call, f"{where} tool call {number}")
                                    for number, call in enumerate(calls, 1)]
    if role == "tool":
        normalized.update({key: message[key] for key in ("tool_call_id", "name") if key in message})
    return normalized


def normalize_messages(messages, field):
    if not isinstance(messages, list):
        raise BadRecord("bad messages", f'"{field}" must be a list of messages, got {type(messages).__name__}')
    if not messages:
        raise BadRecord("empty conversation", f'"{field}" is an empty conversation')
    return [normalize_message(message, f"{field} message {number}") for number, message in enumerate(messages, 1)]


def normalize_tools(record, field):
    """The conversation's tool definitions: a "tools" list beside the messages, or on its system
    message (MiniMind-3's data); a list of objects, or JSON text of one. [] when there are none."""
    tools = record.get("tools")
    messages = record[field] if isinstance(record[field], list) else []
    on_system = [m.get("tools") for m in messages if isinstance(m, dict) and m.get("role") == "system" and m.get("tools")]
    if tools is None and on_system:
        tools = on_system[0]
    if tools is None or tools == "":
        return []
    tools = json_value(tools, '"tools"', list)
    for number, tool in enumerate(tools, 1):
        if not isinstance(tool, dict):
            raise BadRecord("bad tool call", f'"tools" entry {number} must be an object (a function definition), '
                                             f"got {type(tool).__name__}")
    return tools


def normalize_text(record):
    check_string(record["text"], '"text"', reason="non-string text")
    if not record["text"].strip():
        raise BadRecord("empty text", '"text" is empty')
    return {"text": record["text"]}


def normalize_sft(record):
    field = "conversations" if "conversations" in record else "messages"
    messages = normalize_messages(record[field], field)
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no assistant message", f'"{field}" has no assistant message to train on')
    tools = normalize_tools(record, field)
    normalized = {"messages": messages, "tools": tools} if tools else {"messages": messages}
    if isinstance(record.get("skill"), str):   # a label `minimind eval` reports exact match by
        normalized["skill"] = record["skill"]
    return normalized


def is_left_open(messages):
    """The last message is an assistant turn left empty: MiniMind's RL prompt sets (rlaif.jsonl) are
    conversations written so, for the model to write that turn."""
    last = messages[-1]
    return (last["role"] == "assistant" and not last["content"].strip() and not last.get("tool_calls")
            and not last.get("reasoning_content"))


def normalize_open_conversation(record, sft):
    """A GRPO prompt from a conversation whose last assistant turn is empty: the messages before it,
    no reference answer (rewards that need none score it: a reward model, your own function)."""
    prompt = sft["messages"][:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("bad prompt", "the message before the empty assistant turn must be a user message, "
                                      "the question the model answers")
    normalized = {"prompt_messages": prompt, "answer": None, "fields": dict(record)}
    return {**normalized, "tools": sft["tools"]} if sft.get("tools") else normalized


def as_messages(value, field, role):
    if isinstance(value, str):
        return [{"role": role, "content": check_string(value, f'"{field}"')}]
    return normalize_messages(value, field)


def normalize_dpo(record):
    if "chosen" not in record or "rejected" not in record:
        missing = "rejected" if "chosen" in record else "chosen"
        raise BadRecord("missing field", f'a preference pair needs both "chosen" and "rejected"; '
                                         f'"{missing}" is missing' + close_key(record, [missing]))
    if "prompt" in record:
        prompt = as_messages(record["prompt"], "prompt", "user")
        chosen = as_messages(record["chosen"], "chosen", "assistant")
        rejected = as_messages(record["rejected"], "rejected", "assistant")
        if chosen[:len(prompt)] == prompt and rejected[:len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    else:
        # MiniMind's format: two full conversations; their common head is the prompt.
        chosen_all = normalize_messages(record["chosen"], "chosen")
        rejected_all = normalize_messages(record["rejected"], "rejected")
        shared = 0
        while (shared < min(len(chosen_all), len(rejected_all)) - 1
               and chosen_all[shared] == rejected_all[shared]):
            shared += 1
        prompt, chosen, rejected = chosen_all[:shared], chosen_all[shared:], rejected_all[shared:]
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        if not response or any(message["role"] != "assistant" for message in response):
            raise BadRecord("bad preference pair", f'"chosen" and "rejected" must share the same prompt '
                                                   f'and differ only in assistant messages ("{field}" does not)')
    if not prompt or prompt[-1]["role"] == "assistant":
        raise BadRecord("bad preference pair", "the prompt must end with a user message")
    pair = {"prompt_messages": prompt, "chosen": chosen, "rejected": rejected}
    tools = normalize_tools(record, "chosen")
    return {**pair, "tools": tools} if tools else pair


def normalize_prompt(record):
    """A GRPO prompt: the question as messages (a string is one user turn), the reference answer
    the rewards check, and the record's own fields for reward functions that need more."""
    if "answer" not in record:
        raise BadRecord("missing field", 'a GRPO prompt needs an "answer" field (the reference answer the '
                                         'rewards check)' + close_key(record, ["answer"]))
    prompt = as_messages(record["prompt"], "prompt", "user")
    if prompt[-1]["role"] != "user":
        raise BadRecord("bad prompt", '"prompt" must end with a user message, the question the model answers')
    answer = check_string(record["answer"], '"answer"', reason="non-string answer")
    return {"prompt_messages": prompt, "answer": answer, "fields": dict(record)}


@dataclass(frozen=True)
class RecordFormat:
    """One kind of record: the fields that mark it, how it is normalized, how errors name it."""
    name: str
    description: str     # "SFT": "this is an SFT record, but pretraining records are expected here"
    article: str         # "an" SFT record
    marks: tuple         # a record with any of these fields is of this format
    normalize: Callable  # the record (a dict) -> the normalized record; BadRecord when malformed
    fields: str          # how an unrecognised record's error names the fields

    def __str__(self):
        return f"{self.article} {self.description} record"


TEXT = RecordFormat("text", "pretraining", "a", ("text",), normalize_text, '"text"')
CONVERSATIONS = RecordFormat("conversations", "SFT", "an", ("conversations", "messages"), normalize_sft,
                             '"conversations", "messages"')
PAIRS = RecordFormat("pairs", "DPO", "a", ("chosen", "rejected"), normalize_dpo, '"chosen"/"rejected"')
PROMPTS = RecordFormat("prompts", "GRPO prompt", "a", ("prompt",), normalize_prompt, '"prompt"/"answer"')
# In the order a record is recognised: a pair with a "prompt" field is a pair, not a GRPO prompt.
FORMATS = (TEXT, CONVERSATIONS, PAIRS, PROMPTS)
ANY = "any"  # read_records(expected=ANY): every format is welcome (the tokenizer learns from all of them)


def normalize(record):
    """(format, normalized record) for one parsed JSON value; BadRecord if it is none of them."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(record).__name__}")
    for record_format in FORMATS:
        if any(mark in record for mark in record_format.marks):
            normalized = record_format.normalize(record)
            if record_format is CONVERSATIONS and is_left_open(normalized["messages"]):
                # MiniMind's RL prompt sets: a conversation left open for the model's turn is a prompt
                return PROMPTS, normalize_open_conversation(record, normalized)
            return record_format, normalized
    known = [mark for record_format in FORMATS for mark in record_format.marks]
    hints = [record_format.fields for record_format in FORMATS]
    found = ", ".join(f'"{key}"' for key in list(record)[:6]) or "none"
    raise BadRecord("missing field", f'no {", ".join(hints[:-1])} or {hints[-1]} field '
                                     f'(found: {found}{close_key(record, known)})')


class SkippedRecords(dict):
    """Records skipped under --skip_bad_records: reason -> count, and where the first few were."""

    EXAMPLES = 3

    def __init__(self):
        super().__init__()
        self.examples = []  # "file:line: problem" of the first EXAMPLES skipped records

    def add(self, reason, location=None):
        self[reason] = self.get(reason, 0) + 1
        if location and len(self.examples) < self.EXAMPLES:
            self.examples.append(location)

    def merge(self, other):
        for reason, count in other.items():
            self[reason] = self.get(reason, 0) + count
        self.examples = (self.examples + list(getattr(other, "examples", [])))[:self.EXAMPLES]

    def describe(self):
        """'skipped 12 bad records (7 invalid JSON, 5 wrong role); first: a.jsonl:3: invalid JSON ...'"""
        text = f"skipped {format_stats(self)}"
        if self.examples:
            text += "; first: " + "; ".join(self.examples)
        return text


def check_record(value, expected=None):
    """(format, normalized record) for one value from a file (or the BadRecord found reading it), which
    must be a record of `expected` (a RecordFormat; None: of any one format; ANY: of every format);
    BadRecord if it is not."""
    if isinstance(value, BadRecord):
        raise value
    record_format, record = normalize(value)
    if expected not in (None, ANY) and record_format != expected:
        raise BadRecord("mixed stages", f"this is {record_format}, but {expected.description} records "
                                        f"are expected here")
    return record_format, record


def raw_values(path):
    """(line, parsed value or BadRecord) for each record of a file, by its kind."""
    return {"jsonl": raw_jsonl, "json": raw_json_array, "txt": raw_txt, "parquet": raw_parquet}[file_kind(path)](path)


def read_records(path, skip_bad_records=False, stats=None, expected=None):
    """Yield (line_number, normalized record) from one file; see the module docstring.

    stats: a SkippedRecords (or dict) that counts what --skip_bad_records skipped.
    expected: the RecordFormat every record must have; None means the format of the first good
    record, ANY accepts every format.
    """
    for line_number, _, record in read_formatted_records(path, skip_bad_records, stats, expected):
        yield line_number, record


def read_formatted_records(path, skip_bad_records=False, stats=None, expected=None):
    """read_records, with each record's format: (line_number, RecordFormat, normalized record)."""
    path = Path(path)
    check_file(path)
    raw = raw_values(path)
    num_good, first_bad = 0, None
    for line_number, value in raw:
        try:
            record_format, record = check_record(value, expected)
            expected = expected or record_format
        except BadRecord as bad:
            if not skip_bad_records:
                raise bad_record_error(path, line_number, bad.detail)
            first_bad = first_bad or (line_number, bad.detail)
            if isinstance(stats, SkippedRecords):
                stats.add(bad.reason, f"{path}:{line_number}: {bad.detail}")
            elif stats is not None:
                stats[bad.reason] = stats.get(bad.reason, 0) + 1
            continue
        num_good += 1
        yield line_number, record_format, record
    if num_good == 0:
        raise no_usable_records(path, first_bad)


def no_usable_records(path, first_bad):
    """The error for a file without a good record: what is wrong with the first one, when there was one."""
    if first_bad is not None:
        return DataError(path, first_bad[0], f"{first_bad[1]}; no record in the file is usable")
    return DataError(path, None, "no usable records in the file")


def bad_record_error(path, line_number, detail):
    return DataError(path, line_number, detail + " (--skip_bad_records skips such records)")


def read_all_records(paths, skip_bad_records, stats, expected):
    """The records of every file that `paths` name (globs, folders), in order: read_records for each."""
    return [record for path in expand_paths(paths)
            for _, record in read_records(path, skip_bad_records, stats, expected)]


def detect_format(paths):
    """The RecordFormat of the first good record of the first file (a .txt file holds text)."""
    paths = expand_paths(paths)
    if file_kind(paths[0]) == "txt":
        return TEXT
    for _, record_format, _ in read_formatted_records(paths[0], skip_bad_records=True, stats={}):
        return record_format


def format_stats(stats):
    """'12 bad records (7 invalid JSON, 5 wrong role)'."""
    total = sum(stats.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(stats.items(), key=lambda kv: -kv[1]))
    return f"{total} bad record{'s' if total != 1 else ''} ({reasons})"
