"""What a training run is asked to do: small typed configs, filled from flags or a YAML/JSON file.

Each dataclass field is a flag of `python train.py` / `minimind train` with the seed's name; its
type, default, allowed range and help live here and nowhere else (settings.setting). Library code
takes these dataclasses, never the argparse namespace; commands/train.py builds them from flags.

    config = TrainConfig(optim=OptimSettings(epochs=5, learning_rate=3e-4))
    config = parse_train_args(["--epochs", "5", "--learning_rate", "3e-4"])   # minimind.commands.train
    config.optim.epochs, config.data.max_seq_len, config.run.output_dir, config.dpo.dpo_beta

The settings every run has are here; a stage's own (DPOSettings, GRPOSettings ...) live in its module
(training/stages/) and join TrainConfig under the stage's name.
"""
from dataclasses import asdict, dataclass, field, fields, make_dataclass

from ..errors import UserError
from ..model.families import FAMILIES
from ..settings import setting
from .stages import STAGES, check_flags
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MAX_COUNT = 10 ** 9  # "absurd" upper bound for step counts and intervals


@dataclass
class ModelSettings:
    """The model to train: a fresh one of the given family and shape, or --pretrained_path (both from it)."""
    model_family: str = setting(None, "minimind2 or minimind3 (q/k norms, its MoE and defaults: hidden 768, 4 "
                                      "key/value heads) [minimind2, or the pretrained model's]", type=str,
                                choices=list(FAMILIES))
    hidden_size: int = setting(None, "hidden dimension [512; minimind3: 768; or the pretrained model's]", type=int,
                               low=8, high=65536)
    num_layers: int = setting(None, "number of transformer layers [8]", type=int, low=1, high=1024)
    num_heads: int = setting(None, "number of attention (query) heads [8]", type=int, low=1, high=1024)
    num_key_value_heads: int = setting(None, "key/value heads for grouped-query attention [2; minimind3: 4]",
                                       type=int, low=1, high=1024)
    vocab_size: int = setting(None, "vocabulary size [the tokenizer's]", type=int, low=3, high=1 << 24)
    dropout: float = setting(None, "dropout rate [0.1; 0 for DPO]", type=float, low=0, high=1, high_open=True)
    attention_dropout: float = setting(
        0.0, "dropout on attention probabilities; the original applies --dropout there too, but any value > 0 "
             "takes attention off the fused kernel and halves CPU training speed", low=0, high=1, high_open=True)
    use_moe: bool = setting(None, "mixture-of-experts feed-forward [off]", type=bool)
    pretrained_path: str = setting("", "start from weights: an original .pth, our checkpoint, or a HF-style "
                                       "directory (--model is the same flag)", aliases=("model",))
    gradient_checkpointing: bool = setting(
        False, "keep only each block's input for backward and recompute the rest there: ~1/3 more compute for "
               "a fraction of the activation memory (docs/benchmarks.md)")
    compile: bool = setting(False, "torch.compile the decoder stack: on CPU at the seed's shape +11-23%% tokens/s "
                                   "after a 30-70 s compile, so it pays off after ~200 steps (docs/benchmarks.md)")

    def architecture_overrides(self):
        """The MiniMindConfig fields given on the command line (None = not given)."""
        given = {"model_family": self.model_family, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                 "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_key_value_heads,
                 "vocab_size": self.vocab_size, "use_moe": self.use_moe}
        return {name: value for name, value in given.items() if value is not None}


@dataclass
class DataSettings:
    data: list = setting(None, "training files, folders or globs (.jsonl/.json/.txt/.parquet) [the bundled demo "
                               "pretraining corpus]", nargs="+", type=str)
    eval_data: list = setting(None, "validation files [a held-out --val_fraction of --data]", nargs="+", type=str)
    val_fraction: float = setting(0.05, "share of the training data held out when no --eval_data", low=0, high=1,
                                  high_open=True)
    replay_data: list = setting(None, "SFT only: pretraining text replayed beside the conversations, its windows "
                                      "trained on every token each epoch, so that fine-tuning keeps what "
                                      "pretraining stored [none]", nargs="+", type=str)
    eval_max_tokens: int = setting(131072, "validate on at most this many tokens (a fixed sample of the "
                                           "validation set; 0 = all of it)", low=0, high=1 << 40)
    stage: str = setting(None, "training stage [from the data's format]", type=str, choices=list(STAGES))
    tokenizer: str = setting(None, "tokenizer directory [the bundled MiniMind tokenizer]", type=str)
    max_seq_len: int = setting(512, "training sequence length in tokens", low=2, high=1 << 20)
    skip_bad_records: bool = setting(False, "skip malformed records (and report them) instead of stopping")
    num_workers: int = setting(0, "DataLoader worker processes", low=0, high=256)
    prepare_workers: int = setting(None, "processes that tokenize the data into its token cache the first time "
                                         "it is used (0: this one) [every core; this one for files under 8 MB]",
                                   type=int, low=0, high=256)


@dataclass
class OptimSettings:
    epochs: int = setting(3, "passes over the training data (--max_steps overrides it)", low=1, high=MAX_COUNT)
    max_steps: int = setting(None, "train exactly this many optimizer steps, however many epochs that takes "
                                   "[epochs x steps per epoch]", type=int, low=1, high=MAX_COUNT)
    batch_size: int = setting(4, "sequences per micro-batch", low=1, high=1 << 20)
    accumulation_steps: int = setting(1, "micro-batches per optimizer step", low=1, high=1 << 20)
    learning_rate: float = setting(1e-4, "peak learning rate", low=0, high=1, low_open=True)
    min_lr: float = setting(None, "final learning rate of the cosine decay [learning_rate / 10]", type=float,
                            low=0, high=1)
    warmup_steps: int = setting(None, "linear warmup steps [2%% of the run]", type=int, low=0, high=MAX_COUNT)
    weight_decay: float = setting(0.01, "AdamW weight decay (matrices only)", low=0, high=1)
    grad_clip: float = setting(1.0, "max gradient norm (0 disables)", low=0, high=1e6)
    dtype: str = setting("auto", "autocast precision; auto = bfloat16 on a CUDA GPU with bfloat16 units (Ampere on), "
                                 "float16 on an older one, float32 on a CPU or Apple GPU",
                         choices=["auto", "float32", "bfloat16", "float16"])
    seed: int = setting(42, "seeds initialisation, data order and dropout", low=0, high=2 ** 32 - 1)


@dataclass
class LoRASettings:
    lora_rank: int = setting(0, "train LoRA adapters of this rank instead of all weights (0 = off)", low=0, high=65536)
    lora_alpha: float = setting(None, "LoRA scaling alpha [2 x rank]", type=float, low=0, high=1e6, low_open=True)
    lora_dropout: float = setting(0.0, "dropout on the LoRA branch", low=0, high=1, high_open=True)
    lora_targets: str = setting(LORA_TARGETS, "comma-separated module names that get adapters")
    lora_special_tokens: bool = setting(
        True, "with LoRA, also train the embedding rows of <|endoftext|>, <|im_start|>, <|im_end|> (a base "
              "pretrained on plain text has never seen the chat tokens)")

    @property
    def enabled(self):
        return self.lora_rank > 0

    @property
    def targets(self):
        return [name.strip() for name in self.lora_targets.split(",") if name.strip()]

    @property
    def alpha(self):
        return self.lora_alpha or 2 * self.lora_rank


@dataclass
class RunSettings:
    device: str = setting("auto", "where to train: auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, "
                                  "cuda:1, mps")
    num_threads: int = setting(None, "CPU threads for the model's arithmetic [torch's default: one per core; under "
                                     "torchrun, OMP_NUM_THREADS]", type=int, low=1, high=1024)
    output_dir: str = setting("./output", "where models, checkpoints and logs go")
    log_interval: int = setting(10, "log every N optimizer steps", low=1, high=MAX_COUNT)
    save_interval: int = setting(1, "write model_epoch_N.pth (float16 weights, as the original publishes them) every "
                                    "N epochs", low=1, high=MAX_COUNT)
    save_total_limit: int = setting(None, "keep only the newest N model_epoch_N.pth files [all of them]", type=int,
                                    low=1, high=MAX_COUNT)
    save_steps: int = setting(100, "write a resumable checkpoint every N optimizer steps (0 = only at epoch ends)",
                              low=0, high=MAX_COUNT)
    eval_interval: int = setting(0, "validate every N optimizer steps (0 = at the start and at epoch ends)",
                                 low=0, high=MAX_COUNT)
    resume: bool = setting(False, "continue from checkpoint.pt in --output_dir (starts afresh, with a notice, when "
                                  "there is none yet)")
    overwrite: bool = setting(False, "start over in an --output_dir that holds an earlier run: its checkpoint, "
                                     "models and logs are deleted when this run starts (without --resume or "
                                     "--overwrite, such a folder is refused)")
    report_to: str = setting("auto", "auto = TensorBoard when the tensorboard package is installed",
                             choices=["auto", "tensorboard", "none"])
    sample_tokens: int = setting(48, "tokens of the sample generation printed at the end (0 = none)", low=0,
                                 high=1 << 20)
    fsdp: bool = setting(False, "under torchrun: shard parameters, gradients and optimizer state across the ranks "
                                "(FSDP2) instead of a full copy on each; checkpoints stay single files")
    dry_run: bool = setting(False, "set the run up and time a few of its steps, then print how long it will take, "
                                   "its peak memory, tokens, steps and disk, without training or writing to "
                                   "--output_dir (docs/training_guide.md)")


# TrainConfig's parts: (attribute, settings dataclass, --help group), each stage's own flags among them.
GROUPS = [("model", ModelSettings, "model (default: the seed's shape, or the checkpoint's when --pretrained_path is "
                                   "given)"),
          ("data", DataSettings, "data"), ("optim", OptimSettings, "optimisation"),
          ("lora", LoRASettings, "fine-tuning: LoRA"),
          *[(stage.name, stage.settings, stage.settings_title) for stage in STAGES.values() if stage.settings],
          ("run", RunSettings, "outputs and checkpoints")]


def flag_values(self):
    """The flags of a TrainConfig, flattened: {flag name: value}."""
    return {name: value for part in fields(self) for name, value in asdict(getattr(self, part.name)).items()}


# Everything a run needs: config.model, config.data ... config.dpo, config.grpo, config.run; `flags()`
# flattens it back into flag values (run_config.yaml).
TrainConfig = make_dataclass("TrainConfig", [(name, cls, field(default_factory=cls)) for name, cls, _ in GROUPS],
                             namespace={"flags": flag_values, "__doc__": "Everything a run needs (see GROUPS)."})


def check_combinations(config):
    """Checks that involve more than one flag (each flag's own range was checked when it was read)."""
    model, optim = config.model, config.optim
    if optim.min_lr is not None and optim.min_lr > optim.learning_rate:
        raise UserError(f"--min_lr {optim.min_lr:g} is above --learning_rate {optim.learning_rate:g}; the cosine "
                        f"decay goes down to it")
    if model.hidden_size and model.num_heads and model.hidden_size % model.num_heads:
        raise UserError(f"--hidden_size {model.hidden_size} must be divisible by --num_heads {model.num_heads}")
    if model.num_heads and model.num_key_value_heads and model.num_heads % model.num_key_value_heads:
        raise UserError(f"--num_heads {model.num_heads} must be a multiple of --num_key_value_heads "
                        f"{model.num_key_value_heads}")
    if config.lora.enabled and not config.lora.targets:
        raise UserError("--lora_targets is empty; name the linear layers that get adapters, e.g. q_proj,v_proj")
    check_flags(config)
