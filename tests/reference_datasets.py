"""The in-memory SFT, DPO and GRPO datasets as they were before the on-disk caches (commit d461361),
kept as the reference that the cached datasets must match sample for sample: ids, labels, order,
what is dropped. Only the labelling loop and the dataset classes are frozen here; rendering and
finding the trained spans are the library's (conversations.py), which both share.
"""
from minimind.data.conversations import assistant_spans, check_nothing_dropped, encode_chat, render_conversation
from minimind.data.records import CONVERSATIONS, PAIRS, PROMPTS, SkippedRecords, read_all_records

IGNORE_INDEX = -100


def encode_conversations(tokenizer, conversations, train_from=None, tools=None):
    """(ids, labels) lists: the labels are the ids of the tokens inside a trained span, token by token."""
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


def reference_sft(paths, tokenizer, max_seq_len, skip_bad_records=False):
    """[(ids, labels)] in order, and how many were dropped."""
    records = read_all_records(paths, skip_bad_records, SkippedRecords(), CONVERSATIONS)
    samples, dropped = [], 0
    encoded = encode_conversations(tokenizer, [r["messages"] for r in records], tools=[r.get("tools") for r in records])
    for ids, labels in encoded:
        ids, labels, trainable = truncate(ids, labels, max_seq_len)
        if not trainable:
            dropped += 1
            continue
        samples.append((ids, labels))
    return samples, dropped


def reference_dpo(paths, tokenizer, max_seq_len, skip_bad_records=False):
    """[((chosen ids, labels), (rejected ids, labels))] in order, and how many pairs were dropped."""
    records = read_all_records(paths, skip_bad_records, SkippedRecords(), PAIRS)
    conversations, train_from, tools = [], [], []
    for record in records:
        prompt = record["prompt_messages"]
        conversations += [prompt + record["chosen"], prompt + record["rejected"]]
        train_from += [len(prompt), len(prompt)]
        tools += [record.get("tools")] * 2
    encoded = encode_conversations(tokenizer, conversations, train_from, tools)
    samples, dropped = [], 0
    for chosen, rejected in zip(encoded[0::2], encoded[1::2]):
        *chosen, chosen_ok = truncate(*chosen, max_seq_len)
        *rejected, rejected_ok = truncate(*rejected, max_seq_len)
        if not (chosen_ok and rejected_ok):
            dropped += 1
            continue
        samples.append((tuple(chosen), tuple(rejected)))
    return samples, dropped


def reference_prompts(paths, tokenizer, max_seq_len, skip_bad_records=False):
    """[(prompt ids, record)] in order, and how many prompts were too long."""
    records = read_all_records(paths, skip_bad_records, SkippedRecords(), PROMPTS)
    samples, dropped = [], 0
    for record in records:
        ids = encode_chat(tokenizer, record["prompt_messages"])
        if len(ids) > max_seq_len:
            dropped += 1
            continue
        samples.append((ids, record))
    return samples, dropped
