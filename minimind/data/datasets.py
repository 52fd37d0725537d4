"""Records in, tensors out: a dataset per record format (DATASETS).

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

from ..errors import UserError
from ..files import contents_digest
from ..model.kernels import IGNORE_INDEX
from .conversations import encode_chat, encode_conversations
from .records import CONVERSATIONS, PAIRS, PROMPTS, TEXT, SkippedRecords, expand_paths, read_all_records, read_records
from .tokenizer import tokenizer_hash

CACHE_FORMAT_VERSION = 1   # bump when the cache layout or the document joining changes
ENCODE_CHUNK_DOCUMENTS = 2048


# ---------------------------------------------------------------- pretraining: token cache + windows

def default_cache_dir():
    return Path(os.environ.get("MINIMIND_CACHE") or Path.home() / ".cache" / "minimind" / "tokens")


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
            [contents_digest([path]) for path in self.paths]]).encode()).hexdigest()[:24]
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
                    for _, record in read_records(path, skip_bad_records, self.stats, expected=TEXT):
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
        records = read_all_records(paths, skip_bad_records, self.stats, CONVERSATIONS)
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
        records = read_all_records(paths, skip_bad_records, self.stats, PAIRS)
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
        self.stats, self.samples = SkippedRecords(), []
        records = read_all_records(paths, skip_bad_records, self.stats, PROMPTS)
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


# The dataset of each record format (records.FORMATS): what a stage that reads the format trains on.
DATASETS = {TEXT: PretrainDataset, CONVERSATIONS: SFTDataset, PAIRS: DPODataset, PROMPTS: PromptDataset}


def make_dataset(paths, record_format, tokenizer, settings):
    """The dataset of `paths`, whose records have `record_format`; settings: the run's DataSettings."""
    return DATASETS[record_format](paths, tokenizer, settings.max_seq_len, skip_bad_records=settings.skip_bad_records)
