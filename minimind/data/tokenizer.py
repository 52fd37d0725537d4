"""The tokenizer: a byte-level BPE with MiniMind's special tokens and ChatML chat template.

    minimind tokenizer train --data data/pretrain.jsonl --vocab_size 6400 --output_dir my_tokenizer

Byte-level means every UTF-8 string maps to tokens and back exactly (Chinese, emoji, tabs,
runs of spaces): the pre-tokenizer turns bytes into 256 printable symbols and BPE merges those,
so no text is ever unknown. The saved folder (tokenizer.json + tokenizer_config.json) loads
with `transformers.AutoTokenizer.from_pretrained`, like MiniMind2's own tokenizer, which
`load_tokenizer` reads through the same code path.
"""
import hashlib
import json
from pathlib import Path

from ..errors import UserError
from .records import ANY, read_records

DEFAULT_TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"

# Ids as in MiniMind: <|endoftext|> pads (and separates pretraining documents), a turn is
# <|im_start|>role\n ... <|im_end|>, and <|im_end|> is what a chat model emits to stop.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# MiniMind2's ChatML template without its tool-calling branches: for conversations of system,
# user and assistant messages it renders byte-identical text (tests/test_tokenizer.py checks).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] in ['user', 'assistant'] or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def load_tokenizer(path=None):
    """A transformers PreTrainedTokenizerFast from a folder; None means the bundled default."""
    from transformers import AutoTokenizer

    folder = tokenizer_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many kinds; all mean the same to the user
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UserError(f"cannot load the tokenizer in {folder}: {first_line}") from error
    # transformers warns "Token indices sequence length is longer than the specified maximum" when a
    # text has more tokens than tokenizer_config.json's model_max_length, a number that says nothing
    # of the model: every caller here windows or refuses long inputs against the model's own context.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def tokenizer_folder(path=None):
    """The folder of a --tokenizer argument (None: the bundled one), checked to hold tokenizer.json;
    cheap, so the commands check it before loading anything."""
    folder = Path(path) if path is not None else DEFAULT_TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        raise UserError(f"no tokenizer at {folder}: expected a folder with tokenizer.json and "
                        f"tokenizer_config.json (make one with: minimind tokenizer train --output_dir DIR)")
    return folder


def tokenizer_hash(tokenizer):
    """A digest of everything that decides the ids: vocab, merges, special tokens, pre-tokenizer."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()[:16]


def train_texts(files, skip_bad_records=False, stats=None):
    """The strings a tokenizer learns from: documents, or each message as `role\\ncontent` (and its
    thinking and tool calls), and the tool definitions as JSON."""
    for path in files:
        for _, record in read_records(path, skip_bad_records, stats, expected=ANY):
            if "text" in record:
                yield record["text"]
                continue
            messages = record.get("messages") or (  # SFT; DPO pairs; GRPO prompts (and their answer)
                record["prompt_messages"] + record.get("chosen", []) + record.get("rejected", [])
                + ([{"role": "assistant", "content": record["answer"]}] if record.get("answer") else []))
            for message in messages:
                yield message["role"] + "\n" + message["content"]
                if message.get("reasoning_content"):
                    yield message["reasoning_content"]
                for call in message.get("tool_calls", []):
                    yield json.dumps(call["function"], ensure_ascii=False)
            for tool in record.get("tools", []):
                yield json.dumps(tool, ensure_ascii=False)


def train_tokenizer(files, vocab_size, out_dir, skip_bad_records=False, stats=None):
    """Train a byte-level BPE on data files and save it to out_dir; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise UserError(f"--vocab_size {vocab_size} is too small: a byte-level BPE needs at least "
                        f"{minimum} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    tokenizer = Tokenizer(models.BPE())
    # add_prefix_space=False and a plain ByteLevel decoder: decode(encode(text)) == text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # listed first, so they get ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tokenizer.train_from_iterator(train_texts(files, skip_bad_records, stats), trainer=trainer)
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tokenizer.token_to_id(token) == token_id, "special tokens must have ids 0, 1, 2"

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--output_dir {out_dir} is a file; give a folder for tokenizer.json and tokenizer_config.json")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    config = {  # the fields MiniMind2's tokenizer_config.json sets
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "legacy": True,
        "model_max_length": 32768,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as file:
        json.dump(config, file, ensure_ascii=False, indent=2)
        file.write("\n")
    return load_tokenizer(out_dir)


def default_eos_ids(tokenizer, model):
    """The tokens that end a generation: the tokenizer's eos (<|im_end|>, the end of a chat turn)
    and <|endoftext|> (the end of a pretraining document); the config's eos without a tokenizer."""
    if tokenizer is None:
        return [model.config.eos_token_id]
    ids = {tokenizer.eos_token_id}
    if "<|endoftext|>" in tokenizer.get_vocab():
        ids.add(tokenizer.convert_tokens_to_ids("<|endoftext|>"))
    return sorted(i for i in ids if i is not None)
