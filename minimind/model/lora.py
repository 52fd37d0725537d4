"""LoRA adapters through the `peft` library.

LoRA freezes a weight W (out x in) and learns a low-rank update: W x + (alpha / r) * B A x with
A (r x in) and B (out x r), B starting at zero so training starts from the base model exactly.
At rank 8 on the default model's attention and MLP projections that is about 2% of the weights;
the embedding rows of the three special tokens train too (--lora_special_tokens, 1536 numbers).

Adapters are saved in peft's format (adapter_config.json + adapter_model.safetensors), so
`peft.PeftModel.from_pretrained(base, adapter_dir)` opens them, and `minimind merge` folds them
into the base weights (W + alpha/r * B A) for a plain model that runs at full speed.
"""
import copy
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError
from ..files import follow_umask


def lora_config(settings, special_token_ids=()):
    """peft's LoraConfig from our LoRASettings (training/config.py)."""
    from peft import LoraConfig

    # A base pretrained on plain text has never seen <|im_start|>/<|im_end|>: their embedding rows
    # (tied to the output layer, so also "how to predict the end of an answer") are untrained, and
    # adapters on the projections cannot change them. peft's trainable tokens train those rows alone.
    trainable_tokens = {"embed_tokens": sorted(special_token_ids)} if special_token_ids else None
    return LoraConfig(r=settings.lora_rank, lora_alpha=settings.alpha, lora_dropout=settings.lora_dropout,
                      target_modules=settings.targets, bias="none", task_type="CAUSAL_LM",
                      trainable_token_indices=trainable_tokens)


def add_lora(model, settings):
    """Wrap the model with fresh adapters on settings.targets (a LoRASettings); only the adapters train."""
    try:
        from peft import get_peft_model
    except ImportError:
        raise UserError("LoRA needs the peft package: pip install peft") from None
    targets = set(settings.targets)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(targets - present)
    if missing:
        raise UserError(f"--lora_targets: no module named {', '.join(missing)} in the model "
                        f"(linear layers: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)")
    config = model.config
    special = {config.pad_token_id, config.bos_token_id, config.eos_token_id} - {None} if settings.lora_special_tokens else ()
    with quiet_peft():
        return get_peft_model(model, lora_config(settings, special))


@contextmanager
def quiet_peft():
    """peft asks transformers' `is_gradient_checkpointing`, renamed in v5: a FutureWarning that is
    peft's to fix, not the user's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def adapter_state_dict(model):
    """The adapter weights alone, named as peft saves them."""
    from peft import get_peft_model_state_dict
    return get_peft_model_state_dict(model)


def load_adapter_state(model, state):
    """Put adapter weights saved by adapter_state_dict back; every adapter weight must be there."""
    from peft import set_peft_model_state_dict
    expected = set(adapter_state_dict(model))
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"the checkpoint's adapters do not fit --lora_targets/--lora_rank: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    set_peft_model_state_dict(model, state)


def merged_copy(model):
    """A plain MiniMindForCausalLM with the adapters folded in; the training model is untouched."""
    return copy.deepcopy(model).merge_and_unload()


def apply_adapter(model, adapter_dir, merge=True):
    """Load a peft adapter directory onto a model; merged by default (no inference overhead)."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").exists():
        raise UserError(f"{adapter_dir}: not a LoRA adapter directory (no adapter_config.json)")
    try:
        from peft import PeftModel
    except ImportError:
        raise UserError("--adapter needs the peft package: pip install peft") from None
    try:
        with quiet_peft():
            wrapped = PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"{adapter_dir}: the adapter does not fit this base model ({str(error).splitlines()[0][:200]})") from None
    return wrapped.merge_and_unload() if merge else wrapped


def save_adapter(model, adapter_dir):
    """The adapters in peft's format (adapter_config.json, adapter_model.safetensors), readable as
    the umask says (safetensors writes them private)."""
    model.save_pretrained(adapter_dir)
    return follow_umask(adapter_dir)
