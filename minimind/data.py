"""Records in, tensors out: a dataset per training stage, and batching.

Pretraining text is tokenized once into a uint16 token cache and cut into full windows; SFT and
DPO samples are rendered with the chat template and trained on the assistant tokens only; GRPO
prompts are rendered up to the assistant header, for the model to answer.
Reading and checking the files themselves is records.py's work.
"""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .records import SkippedRecords, expand_paths, read_all_records, read_records
from .tokenizer import tokenizer_hash

IGNORE_INDEX = -100
CACHE_FORMAT_VERSION = 1   # bump when the cache layout or the document joining changes
ENCODE_CHUNK_DOCUMENTS = 2048


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
    Beside it, `KEY.json` records the records skipped under skip_bad_records, so a run that reads
    the cache reports them too (and one without the flag still refuses the file).
    """

    def __init__(self, paths, tokenizer, max_seq_len, cache_dir=None, skip_bad_records=False):
        self.paths = expand_paths(paths)
        self.max_seq_len = max_seq_len
        self.stats = SkippedRecords()
        self.dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
        key = hashlib.sha256(json.dumps([
            CACHE_FORMAT_VERSION, tokenizer_hash(tokenizer), np.dtype(self.dtype).name,
            [file_digest(path) for path in self.paths]]).encode()).hexdigest()[:24]
        self.cache_path = Path(cache_dir or default_cache_dir()) / f"{key}.{np.dtype(self.dtype).name}"
        self.cache_hit = self.cache_path.is_file()
        if self.cache_hit:
            self.read_skipped(skip_bad_records)
        else:
            self.write_cache(tokenizer, skip_bad_records)
        self.num_tokens = self.cache_path.stat().st_size // np.dtype(self.dtype).itemsize
        if self.num_tokens < max_seq_len:
            raise UserError(f"{', '.join(map(str, self.paths))}: only {self.num_tokens} tokens, "
                            f"fewer than one window of max_seq_len={max_seq_len}; pass a smaller --max_seq_len")
        self.tokens = None  # opened lazily, so the dataset pickles cheaply into DataLoader workers

    @property
    def skipped_path(self):
        return self.cache_path.with_suffix(".json")

    def read_skipped(self, skip_bad_records):
        if not self.skipped_path.is_file():
            return
        saved = json.loads(self.skipped_path.read_text())
        if saved["counts"] and not skip_bad_records:
            raise UserError(f"{saved['examples'][0]} (--skip_bad_records skips such records)")
        self.stats.update(saved["counts"])
        self.stats.examples = saved["examples"]

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
            if self.stats:
                self.skipped_path.write_text(json.dumps({"counts": dict(self.stats), "examples": self.stats.examples}))
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


def encode_conversations(tokenizer, conversations, train_from=None, tools=None):
    """Render each conversation with the chat template; label only assistant turns.

    A trained span is what an assistant message renders to after its `<|im_start|>assistant\\n`
    header, through its closing <|im_end|>: thinking (`reasoning_content`), content and tool calls.
    The header, system, user and tool turns, and the newline after <|im_end|> get IGNORE_INDEX.
    train_from[i] (optional) trains only messages from that index on (DPO: the responses, not
    assistant turns inside the prompt). tools[i] (optional): conversation i's tool definitions.
    Returns (ids, labels) lists.
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
    is dropped and counted in `num_dropped`.
    """

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False):
        self.stats, self.samples, self.num_dropped = SkippedRecords(), [], 0
        records = read_all_records(paths, skip_bad_records, self.stats, stage="sft")
        conversations = [record["messages"] for record in records]
        tools = [record.get("tools") for record in records]
        for ids, labels in encode_conversations(tokenizer, conversations, tools=tools):
            ids, labels, trainable = truncate(ids, labels, max_seq_len)
            if not trainable:
                self.num_dropped += 1
                continue
            self.samples.append((ids, labels))
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
        self.stats, self.samples, self.num_dropped = SkippedRecords(), [], 0
        records = read_all_records(paths, skip_bad_records, self.stats, stage="dpo")
        conversations, train_from, tools = [], [], []
        for record in records:
            prompt = record["prompt_messages"]
            conversations += [prompt + record["chosen"], prompt + record["rejected"]]
            train_from += [len(prompt), len(prompt)]
            tools += [record.get("tools")] * 2
        encoded = encode_conversations(tokenizer, conversations, train_from, tools)
        for chosen, rejected in zip(encoded[0::2], encoded[1::2]):
            *chosen, chosen_ok = truncate(*chosen, max_seq_len)
            *rejected, rejected_ok = truncate(*rejected, max_seq_len)
            if not (chosen_ok and rejected_ok):
                self.num_dropped += 1
                continue
            self.samples.append((chosen, rejected))
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


class PromptDataset(torch.utils.data.Dataset):
    """GRPO prompts: each rendered with the chat template up to the assistant header (the model
    writes the rest), with its record, whose reference answer and fields the rewards read.

    Labels are all IGNORE_INDEX: a prompt has nothing to imitate; GRPO trains on the answers it
    samples. A prompt longer than max_seq_len is dropped and counted (stats["prompt too long"]).
    """

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False):
        from .generation import encode_chat
        self.stats, self.samples = SkippedRecords(), []
        records = read_all_records(paths, skip_bad_records, self.stats, stage="grpo")
        for record in records:
            ids = encode_chat(tokenizer, record["prompt_messages"])
            if len(ids) > max_seq_len:
                self.stats["prompt too long"] = self.stats.get("prompt too long", 0) + 1
                continue
            self.samples.append((ids, record))
        if not self.samples:
            raise UserError(f"no GRPO prompt fits max_seq_len={max_seq_len}")
        self.lengths = [len(ids) for ids, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        ids, record = self.samples[index]
        return {"input_ids": torch.tensor(ids), "labels": torch.full((len(ids),), IGNORE_INDEX), "record": record}


# ---------------------------------------------------------------- batching

def collate(batch, pad_token_id=0):
    """Right-pad to the longest item: input_ids with pad_token_id, labels with -100, a 1/0 mask.

    DPO items become one batch of chosen sequences followed by their rejected ones, so a
    single forward pass scores both halves. GRPO items' records travel along as a list ("records").
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
    collated = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if "record" in batch[0]:
        collated["records"] = [item["record"] for item in batch]
    return collated


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
