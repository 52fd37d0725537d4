"""Data files in, tensors out: one reader for every format, and a dataset per training stage.

Files: `.jsonl` (one JSON object a line), `.json` (an array of objects), `.txt` (plain text,
documents separated by blank lines), `.parquet` (needs pyarrow). The stage comes from the records:

    pretraining  {"text": "..."}                                        (or a .txt file)
    SFT          {"conversations": [{"role": "user", "content": "..."}, ...]}   (MiniMind)
                 {"messages": [...]}                                              (OpenAI style)
    DPO          {"chosen": [messages], "rejected": [messages]}                   (MiniMind)
                 {"prompt": "...", "chosen": "...", "rejected": "..."}

`read_records` normalizes them to

    pretraining  {"text": str}
    SFT          {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    DPO          {"prompt_messages": [messages], "chosen": [assistant messages],
                  "rejected": [assistant messages]}

A malformed record raises DataError naming the file, the line and the problem, or, with
skip_bad_records, is counted in `stats` (reason -> count) and skipped.

Pretraining text is tokenized once into a uint16 token cache and cut into full windows; SFT and
DPO samples are rendered with the chat template and trained on the assistant tokens only.
"""
import difflib
import glob
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import DataError, UserError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
CACHE_FORMAT_VERSION = 1   # bump when the cache layout or the document joining changes
ENCODE_CHUNK_DOCUMENTS = 2048
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
        raise BadRecord("invalid JSON", f"invalid JSON ({error.msg} {where})")


def raw_jsonl(path):
    """(line, object or BadRecord) for each non-blank line."""
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, 1):
            try:
                line = decode_line(raw)
                if line.startswith("\ufeff") and line_number == 1:
                    line = line[1:]
                if not line.strip():
                    continue
                yield line_number, parse_json(line)
            except BadRecord as bad:
                yield line_number, bad


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
            raise DataError(path, error.lineno, f"invalid JSON ({error.msg} at column {error.colno})")
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
        raise UserError(f"{path}: reading .parquet files needs pyarrow (pip install pyarrow); "
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


def normalize_messages(messages, field):
    if not isinstance(messages, list):
        raise BadRecord("bad messages", f'"{field}" must be a list of messages, got {type(messages).__name__}')
    if not messages:
        raise BadRecord("empty conversation", f'"{field}" is an empty conversation')
    normalized = []
    for number, message in enumerate(messages, 1):
        where = f'{field} message {number}'
        if not isinstance(message, dict):
            raise BadRecord("bad messages", f"{where} must be an object with role and content, "
                                            f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise BadRecord("missing field", f'{where} has no "{key}" field'
                                                  + close_key(message, ["role", "content"]))
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise BadRecord("wrong role", f"{where} has role {json.dumps(role, ensure_ascii=False)}; "
                                          f"expected one of {', '.join(ROLES)}")
        normalized.append({"role": role, "content": check_string(content, f"{where} content")})
    return normalized


def normalize_sft(record):
    field = "conversations" if "conversations" in record else "messages"
    messages = normalize_messages(record[field], field)
    if not any(message["role"] == "assistant" for message in messages):
        raise BadRecord("no assistant message", f'"{field}" has no assistant message to train on')
    return {"messages": messages}


def as_messages(value, field, role):
    if isinstance(value, str):
        return [{"role": role, "content": check_string(value, f'"{field}"')}]
    return normalize_messages(value, field)


def normalize_dpo(record):
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
    return {"prompt_messages": prompt, "chosen": chosen, "rejected": rejected}


def normalize(record):
    """(stage, normalized record) for one parsed JSON value; BadRecord if it is none of them."""
    if not isinstance(record, dict):
        raise BadRecord("not an object", f"expected a JSON object, got {type(record).__name__}")
    if "text" in record:
        check_string(record["text"], '"text"', reason="non-string text")
        if not record["text"].strip():
            raise BadRecord("empty text", '"text" is empty')
        return "pretrain", {"text": record["text"]}
    if "conversations" in record or "messages" in record:
        return "sft", normalize_sft(record)
    if "chosen" in record and "rejected" in record:
        return "dpo", normalize_dpo(record)
    if "chosen" in record or "rejected" in record:
        missing = "rejected" if "chosen" in record else "chosen"
        raise BadRecord("missing field", f'a preference pair needs both "chosen" and "rejected"; '
                                         f'"{missing}" is missing' + close_key(record, [missing]))
    known = ["text", "conversations", "messages", "chosen", "rejected", "prompt"]
    found = ", ".join(f'"{key}"' for key in list(record)[:6]) or "none"
    raise BadRecord("missing field", f'no "text", "conversations", "messages" or "chosen"/"rejected" '
                                     f"field (found: {found}{close_key(record, known)})")


STAGE_NAMES = {"pretrain": "pretraining", "sft": "SFT", "dpo": "DPO"}


def read_records(path, skip_bad_records=False, stats=None, stage=None):
    """Yield (line_number, normalized record) from one file; see the module docstring.

    stage: the stage every record must belong to; None means the stage of the first good record,
    "any" accepts every kind (the tokenizer learns from all of them).
    """
    path = Path(path)
    check_file(path)
    kind = file_kind(path)
    raw = {"jsonl": raw_jsonl, "json": raw_json_array, "txt": raw_txt, "parquet": raw_parquet}[kind](path)
    num_good = 0
    for line_number, value in raw:
        try:
            if isinstance(value, BadRecord):
                raise value
            record_stage, record = normalize(value)
            if stage is None:
                stage = record_stage
            elif record_stage != stage and stage != "any":
                article = "an" if record_stage == "sft" else "a"
                raise BadRecord("mixed stages", f"this is {article} {STAGE_NAMES[record_stage]} record, but "
                                                f"{STAGE_NAMES[stage]} records are expected here")
        except BadRecord as bad:
            if not skip_bad_records:
                raise DataError(path, line_number, bad.detail + " (--skip_bad_records skips such records)")
            if stats is not None:
                stats[bad.reason] = stats.get(bad.reason, 0) + 1
            continue
        num_good += 1
        yield line_number, record
    if num_good == 0:
        raise DataError(path, None, "no usable records in the file")


def detect_stage(paths):
    """'pretrain', 'sft' or 'dpo', from the first good record of the first file."""
    paths = expand_paths(paths)
    if file_kind(paths[0]) == "txt":
        return "pretrain"
    stage = None
    for _, record in read_records(paths[0], skip_bad_records=True, stats={}):
        stage = "pretrain" if "text" in record else "sft" if "messages" in record else "dpo"
        break
    return stage


def format_stats(stats):
    """'12 bad records (7 invalid JSON, 5 wrong role)'."""
    total = sum(stats.values())
    reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(stats.items(), key=lambda kv: -kv[1]))
    return f"{total} bad record{'s' if total != 1 else ''} ({reasons})"


# ---------------------------------------------------------------- pretraining: token cache + windows

def default_cache_dir():
    return Path(os.environ.get("MINIMIND_CACHE") or Path.home() / ".cache" / "minimind" / "tokens")


def file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class PretrainDataset(torch.utils.data.Dataset):
    """Documents joined by <|endoftext|> into one token stream, cut into full max_seq_len windows.

    The stream lives in a uint16 file (`cache_path`) named by the hash of the data files'
    contents, the tokenizer and the cache format, so a later run with the same data and
    tokenizer reads it back without tokenizing, and any change gives a new file. It is written
    in chunks to a temporary name and renamed when complete: a killed run leaves no half cache.
    """

    def __init__(self, paths, tokenizer, max_seq_len, cache_dir=None, skip_bad_records=False):
        from .tokenizer import tokenizer_hash

        self.paths = expand_paths(paths)
        self.max_seq_len = max_seq_len
        self.stats = {}
        self.dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
        key = hashlib.sha256(json.dumps([
            CACHE_FORMAT_VERSION, tokenizer_hash(tokenizer), np.dtype(self.dtype).name,
            [file_digest(path) for path in self.paths]]).encode()).hexdigest()[:24]
        self.cache_path = Path(cache_dir or default_cache_dir()) / f"{key}.{np.dtype(self.dtype).name}"
        self.cache_hit = self.cache_path.is_file()
        if not self.cache_hit:
            self.write_cache(tokenizer, skip_bad_records)
        self.num_tokens = self.cache_path.stat().st_size // np.dtype(self.dtype).itemsize
        if self.num_tokens < max_seq_len:
            raise UserError(f"{', '.join(map(str, self.paths))}: only {self.num_tokens} tokens, "
                            f"fewer than one window of max_seq_len={max_seq_len}")
        self.tokens = None  # opened lazily, so the dataset pickles cheaply into DataLoader workers

    def write_cache(self, tokenizer, skip_bad_records):
        separator = tokenizer.get_vocab().get("<|endoftext|>", tokenizer.eos_token_id)
        if separator is None:
            raise UserError("the tokenizer has neither <|endoftext|> nor an eos token to separate documents")
        backend = tokenizer.backend_tokenizer
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.partial")
        try:
            with open(temporary, "wb") as out:
                def flush(documents):
                    # encode_batch runs on all cores; each document is followed by the separator
                    for encoding in backend.encode_batch(documents, add_special_tokens=False):
                        out.write(np.asarray(encoding.ids + [separator], dtype=self.dtype).tobytes())

                for path in self.paths:
                    documents = []
                    for _, record in read_records(path, skip_bad_records, self.stats, stage="pretrain"):
                        documents.append(record["text"])
                        if len(documents) == ENCODE_CHUNK_DOCUMENTS:
                            flush(documents)
                            documents = []
                    flush(documents)
            os.replace(temporary, self.cache_path)
        finally:
            temporary.unlink(missing_ok=True)

    def __len__(self):
        return self.num_tokens // self.max_seq_len

    def __getitem__(self, index):
        if self.tokens is None:
            self.tokens = np.memmap(self.cache_path, dtype=self.dtype, mode="r")
        start = index * self.max_seq_len
        window = torch.from_numpy(self.tokens[start:start + self.max_seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window.clone()}


# ---------------------------------------------------------------- SFT and DPO: chat template + label mask

def encode_conversations(tokenizer, conversations, train_from=None):
    """Render each conversation with the chat template; label only assistant turns.

    A trained span is an assistant message's content and its closing <|im_end|>; the
    `<|im_start|>assistant\\n` header, system and user turns, and the newline after <|im_end|>
    get IGNORE_INDEX. train_from[i] (optional) trains only messages from that index on (DPO:
    the responses, not assistant turns inside the prompt). Returns (ids, labels) lists.
    """
    texts, spans = [], []
    for number, messages in enumerate(conversations):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        first = train_from[number] if train_from else 0
        cursor, trained = 0, []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            header = "<|im_start|>assistant\n"
            start = text.find(header + message["content"] + "<|im_end|>", cursor)
            if start < 0:
                raise UserError("the tokenizer's chat template does not render assistant turns as "
                                "<|im_start|>assistant\\n...<|im_end|>; use a ChatML template")
            start += len(header)
            cursor = start + len(message["content"]) + len("<|im_end|>")
            if index >= first:
                trained.append((start, cursor))
        texts.append(text)
        spans.append(trained)

    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    results = []
    for encoding, trained in zip(encodings, spans):
        ids = encoding.ids
        labels = [IGNORE_INDEX] * len(ids)
        span = 0
        for position, (start, end) in enumerate(encoding.offsets):
            while span < len(trained) and start >= trained[span][1]:
                span += 1
            if span < len(trained) and start >= trained[span][0] and end <= trained[span][1]:
                labels[position] = ids[position]
        results.append((ids, labels))
    return results


def truncate(ids, labels, max_seq_len):
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    return ids, labels, any(label != IGNORE_INDEX for label in labels)


class SFTDataset(torch.utils.data.Dataset):
    """Chat-template-rendered conversations, trained on the assistant tokens only.

    Samples longer than max_seq_len are cut at the end; one left with no assistant token
    is dropped and counted in `num_dropped` (and in stats["truncated to no answer"]).
    """

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False):
        self.stats, self.samples, self.num_dropped = {}, [], 0
        conversations = [record["messages"] for path in expand_paths(paths)
                         for _, record in read_records(path, skip_bad_records, self.stats, stage="sft")]
        for ids, labels in encode_conversations(tokenizer, conversations):
            ids, labels, trainable = truncate(ids, labels, max_seq_len)
            if not trainable:
                self.num_dropped += 1
                continue
            self.samples.append((ids, labels))
        if self.num_dropped:
            self.stats["truncated to no answer"] = self.num_dropped
        if not self.samples:
            raise UserError(f"no SFT sample fits max_seq_len={max_seq_len} with an answer token left")
        self.lengths = [len(ids) for ids, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ids, labels = self.samples[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels)}


class DPODataset(torch.utils.data.Dataset):
    """Preference pairs: prompt + chosen and prompt + rejected, labels on the response tokens."""

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False):
        self.stats, self.samples, self.num_dropped = {}, [], 0
        records = [record for path in expand_paths(paths)
                   for _, record in read_records(path, skip_bad_records, self.stats, stage="dpo")]
        conversations, train_from = [], []
        for record in records:
            prompt = record["prompt_messages"]
            conversations += [prompt + record["chosen"], prompt + record["rejected"]]
            train_from += [len(prompt), len(prompt)]
        encoded = encode_conversations(tokenizer, conversations, train_from)
        for chosen, rejected in zip(encoded[0::2], encoded[1::2]):
            *chosen, chosen_ok = truncate(*chosen, max_seq_len)
            *rejected, rejected_ok = truncate(*rejected, max_seq_len)
            if not (chosen_ok and rejected_ok):
                self.num_dropped += 1
                continue
            self.samples.append((chosen, rejected))
        if self.num_dropped:
            self.stats["truncated to no answer"] = self.num_dropped
        if not self.samples:
            raise UserError(f"no DPO pair fits max_seq_len={max_seq_len} with a response token left")
        self.lengths = [max(len(chosen[0]), len(rejected[0])) for chosen, rejected in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = self.samples[index]
        return {"chosen_input_ids": torch.tensor(chosen_ids), "chosen_labels": torch.tensor(chosen_labels),
                "rejected_input_ids": torch.tensor(rejected_ids),
                "rejected_labels": torch.tensor(rejected_labels)}


# ---------------------------------------------------------------- batching

def collate(batch, pad_token_id=0):
    """Right-pad to the longest item: input_ids with pad_token_id, labels with -100, a 1/0 mask.

    DPO items become one batch of chosen sequences followed by their rejected ones, so a
    single forward pass scores both halves.
    """
    if "chosen_input_ids" in batch[0]:
        batch = ([{"input_ids": item["chosen_input_ids"], "labels": item["chosen_labels"]} for item in batch]
                 + [{"input_ids": item["rejected_input_ids"], "labels": item["rejected_labels"]}
                    for item in batch])
    length = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        size = len(item["input_ids"])
        input_ids[row, :size] = item["input_ids"]
        labels[row, :size] = item["labels"]
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def batch_indices(lengths, batch_size, seed, epoch, shuffle=True, group_by_length=True, drop_last=False,
                  num_samples=None):
    """The batches of one epoch as lists of sample indices; the same arguments give the same list.

    Length grouping: shuffle, sort each mega-chunk of 50 batches by length so a batch holds
    samples of similar length (little padding), then shuffle the batch order so the model does
    not see all short samples first. lengths may be None without grouping (give num_samples).
    """
    count = len(lengths) if lengths is not None else num_samples
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(count) if shuffle else np.arange(count)
    if group_by_length:
        lengths = np.asarray(lengths)
        chunk = 50 * batch_size
        order = np.concatenate([
            part[np.argsort(-lengths[part], kind="stable")]
            for part in np.split(order, range(chunk, count, chunk))]) if count else order
    batches = [order[start:start + batch_size].tolist() for start in range(0, count, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def padding_waste(batches, lengths):
    """Fraction of positions in the padded batches that are padding."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded if padded else 0.0
