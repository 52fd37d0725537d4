"""Records in, tensors out: a dataset per record format (DATASETS), each a view on the data set's
token cache.

Every format's data is tokenized once into an on-disk cache (prepare.py, cache.py) and read back
through memory maps, so memory holds only a few bytes per sample (where each one starts, how long
it is) and the batch being trained. Pretraining text is one token stream cut into full windows; SFT
and DPO samples are conversations trained on the assistant tokens only; GRPO prompts end with the
assistant header, for the model to answer. What depends on --max_seq_len (truncation, what is
dropped) is decided here, on the cache's offsets, so one cache serves every length.
"""
import numpy as np
import torch

from ..errors import UserError
from ..model.labels import IGNORE_INDEX
from .prepare import describe_cache, prepare
from .records import CONVERSATIONS, PAIRS, PROMPTS, TEXT, expand_paths


class CachedDataset(torch.utils.data.Dataset):
    """The part every format shares: the cache prepared (or found), the records skipped under
    --skip_bad_records (`stats`), the one-line summary (`describe`)."""

    record_format = None  # records.FORMATS: what the files hold, and so what the cache keeps of them

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False, cache_dir=None, workers=None,
                 progress=True):
        self.paths = expand_paths(paths)
        self.max_seq_len = max_seq_len
        self.cache = prepare(self.record_format, self.paths, tokenizer, cache_dir, skip_bad_records, workers, progress)
        self.stats = self.cache.skipped_records(skip_bad_records)
        self.num_dropped = 0

    @property
    def cache_hit(self):
        return self.cache.hit

    @property
    def cache_path(self):
        return self.cache.folder

    def describe(self):
        """'data/sft.jsonl: 2,700 records read, 0 skipped, 3 dropped as too long (--max_seq_len 512),
        120,000 tokens; cache 0.4 MB in ... (prepared in 2 s)'"""
        summary = self.cache.summary
        names = ", ".join(str(path) for path in self.paths[:3]) + (", ..." if len(self.paths) > 3 else "")
        skipped = sum(summary["skipped"].values())
        dropped = f"{self.num_dropped:,} dropped as too long (--max_seq_len {self.max_seq_len}), " \
            if self.record_format is not TEXT else ""
        return (f"{names}: {summary['records'] + skipped:,} records read, {skipped:,} skipped, {dropped}"
                f"{summary['tokens']:,} tokens; {describe_cache(self.cache)}")

    def tokens_of(self, sequence):
        """Sequence `sequence` of the cache cut to max_seq_len: input_ids and labels (-100 where not trained)."""
        ids, trained = self.cache.sequence(sequence, self.max_seq_len)
        input_ids = torch.from_numpy(ids.astype(np.int64))
        if trained is None:
            return input_ids, torch.full_like(input_ids, IGNORE_INDEX)
        return input_ids, torch.where(torch.from_numpy(trained.astype(bool)), input_ids, IGNORE_INDEX)


class PretrainDataset(CachedDataset):
    """Documents joined by <|endoftext|> into one token stream, cut into full max_seq_len windows.

    No position is padding and labels == input_ids (the model shifts them inside its loss); the last
    partial window is left out."""

    record_format = TEXT

    def __init__(self, paths, tokenizer, max_seq_len, cache_dir=None, skip_bad_records=False, workers=None,
                 progress=True):
        super().__init__(paths, tokenizer, max_seq_len, skip_bad_records, cache_dir, workers, progress)
        self.num_tokens = self.cache.num_tokens
        if self.num_tokens < max_seq_len:
            raise UserError(f"{', '.join(map(str, self.paths))}: only {self.num_tokens} tokens, "
                            f"fewer than one window of max_seq_len={max_seq_len}; pass a smaller --max_seq_len")

    def __len__(self):
        return self.num_tokens // self.max_seq_len

    def __getitem__(self, index):
        start = index * self.max_seq_len
        window = torch.from_numpy(self.cache.ids[start:start + self.max_seq_len].astype(np.int64))
        return {"input_ids": window, "labels": window.clone()}


def trainable(cache, sequences, max_seq_len):
    """Which of `sequences` keep a trained token once cut to max_seq_len."""
    first = cache.first_trained[sequences]
    return (first < cache.lengths[sequences]) & (first < max_seq_len)


class SFTDataset(CachedDataset):
    """Chat-template-rendered conversations, trained on the assistant tokens only.

    Samples longer than max_seq_len are cut at the end; one left with no assistant token is dropped
    and counted in `num_dropped`. `lengths`: each sample's tokens, for length-grouped batches."""

    record_format = CONVERSATIONS

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False, **options):
        super().__init__(paths, tokenizer, max_seq_len, skip_bad_records, **options)
        everything = np.arange(len(self.cache))
        self.samples = everything[trainable(self.cache, everything, max_seq_len)]  # cache sequence of each sample
        self.num_dropped = len(everything) - len(self.samples)
        if not len(self.samples):
            raise UserError(f"no SFT sample fits max_seq_len={max_seq_len} with an answer token left")
        self.lengths = np.minimum(self.cache.lengths[self.samples], max_seq_len)
        self.token_counts = self.lengths  # real (non-pad) tokens each sample puts in a batch

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        input_ids, labels = self.tokens_of(self.samples[index])
        return {"input_ids": input_ids, "labels": labels}


class DPODataset(CachedDataset):
    """Preference pairs: prompt + chosen and prompt + rejected (cache sequences 2i and 2i + 1),
    labels on the response tokens. A pair where either side has no response token left within
    max_seq_len is dropped and counted in `num_dropped`."""

    record_format = PAIRS

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False, **options):
        super().__init__(paths, tokenizer, max_seq_len, skip_bad_records, **options)
        chosen = np.arange(0, len(self.cache), 2)
        kept = trainable(self.cache, chosen, max_seq_len) & trainable(self.cache, chosen + 1, max_seq_len)
        self.samples = chosen[kept]  # each pair's chosen sequence; its rejected one follows it
        self.num_dropped = len(chosen) - len(self.samples)
        if not len(self.samples):
            raise UserError(f"no DPO pair fits max_seq_len={max_seq_len} with a response token left")
        chosen_lengths, rejected_lengths = (np.minimum(self.cache.lengths[self.samples + side], max_seq_len)
                                            for side in (0, 1))
        self.lengths = np.maximum(chosen_lengths, rejected_lengths)  # a batch pads both sides to the longest
        self.token_counts = chosen_lengths + rejected_lengths

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        chosen_ids, chosen_labels = self.tokens_of(self.samples[index])
        rejected_ids, rejected_labels = self.tokens_of(self.samples[index] + 1)
        return {"chosen_input_ids": chosen_ids, "chosen_labels": chosen_labels,
                "rejected_input_ids": rejected_ids, "rejected_labels": rejected_labels}


class PromptDataset(CachedDataset):
    """GRPO prompts: each rendered with the chat template up to the assistant header (the model
    writes the rest), with its record, whose reference answer (if any) and fields the rewards read.

    Labels are all IGNORE_INDEX: a prompt has nothing to imitate; GRPO trains on the answers it
    samples. A prompt longer than max_seq_len is dropped and counted in `num_dropped`."""

    record_format = PROMPTS

    def __init__(self, paths, tokenizer, max_seq_len, skip_bad_records=False, **options):
        super().__init__(paths, tokenizer, max_seq_len, skip_bad_records, **options)
        self.samples = np.flatnonzero(self.cache.lengths <= max_seq_len)
        self.num_dropped = len(self.cache) - len(self.samples)
        if not len(self.samples):
            raise UserError(f"no GRPO prompt fits max_seq_len={max_seq_len}")
        self.lengths = self.token_counts = self.cache.lengths[self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        input_ids, labels = self.tokens_of(self.samples[index])
        return {"input_ids": input_ids, "labels": labels, "record": self.cache.record(self.samples[index]),
                "index": index}


# The dataset of each record format (records.FORMATS): what a stage that reads the format trains on.
DATASETS = {TEXT: PretrainDataset, CONVERSATIONS: SFTDataset, PAIRS: DPODataset, PROMPTS: PromptDataset}


def make_dataset(paths, record_format, tokenizer, settings):
    """The dataset of `paths`, whose records have `record_format`; settings: the run's DataSettings."""
    return DATASETS[record_format](paths, tokenizer, settings.max_seq_len, skip_bad_records=settings.skip_bad_records,
                                   workers=settings.prepare_workers)
