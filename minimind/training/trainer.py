"""The trainer: one object that owns a training run, for every stage.

    trainer = Trainer(parse_train_args(["--data", "data/sft_train.jsonl"]))
    trainer.run()        # setup, then epochs of steps with validation, checkpoints and logs, then finish

It holds the model, the optimizer and learning-rate schedule, the data order, the checkpoints and the
metrics log; its methods read in the order a run happens: setup (data -> model -> optimizer), run
(the loop), step (one optimizer step over a few micro-batches), validate, save / resume, finish.
What differs between the stages (records, collation, loss, reference model, sample) comes from the
stage table (stages/); mixed precision, accumulation, clipping, checkpoints and logging are shared.

`python train.py` and `minimind train` both build it from flags (commands/train.py).
"""
import math
import random
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import yaml

from ..data.batching import collate
from ..data.cache import data_fingerprint
from ..data.datasets import make_dataset
from ..data.records import TEXT, detect_format, expand_paths
from ..data.tokenizer import load_tokenizer
from ..devices import native_bfloat16, resolve_device
from ..errors import UserError
from ..files import atomic_write, contents_digest
from ..inference.decoding import generate
from ..model.checkpoint import load_config, load_model, load_weights, save_model_directory, save_state_dict
from ..model.config import MiniMindConfig
from ..model.lora import adapter_state_dict, add_lora, load_adapter_state, merged_copy, save_adapter
from ..model.model import MiniMindForCausalLM
from .checkpoint import load_training_state, rng_state, save_training_state, set_rng_state
from .distributed import World
from .estimate import Timeline, count_workload, size_text, timed
from .output_dir import CHECKPOINT_NAME, RUN_CONFIG_NAME, check_output_dir, remove_earlier_run
from .run_log import MetricsLog, peak_memory, plot_losses, print_banner
from .schedule import (Mixture, Plan, cosine_schedule, due_after, epoch_steps, micro_batches_of,
                       split_validation, validation_batches)
from .stages import STAGES, resume_flags, stage_for

BUNDLED_DATA = Path(__file__).resolve().parents[2] / "data"
# Flags that decide what is being trained: a --resume that changes one would continue some other run.
# (The batch is compared as the global batch: per-rank batch x ranks x accumulation.) Each stage adds
# its own (stages/: GRPO's sampling, distillation's teacher ...).
MUST_MATCH_ON_RESUME = (
    "data", "eval_data", "val_fraction", "replay_data", "stage", "tokenizer", "max_seq_len", "skip_bad_records",
    "seed", "model_family", "hidden_size", "num_layers", "num_heads", "num_key_value_heads", "vocab_size", "use_moe",
    "pretrained_path", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "lora_special_tokens", "fsdp",
    *resume_flags(),
)


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""
    epoch: int = 0             # epochs completed
    step_in_epoch: int = 0     # optimizer steps done in the current epoch
    global_step: int = 0       # optimizer steps done
    tokens: int = 0            # real (non-pad) tokens trained on so far
    epoch_loss_sum: float = 0.0
    epoch_loss_count: int = 0
    metrics_rows: int = 0      # rows in metrics.jsonl when the checkpoint was written


class Trainer:
    def __init__(self, config):
        self.config = config
        self.output_dir = Path(config.run.output_dir)
        self.checkpoint_path = self.output_dir / CHECKPOINT_NAME
        self.bar = None
        self.world = World()
        self.stop = StopRequested(self.say)  # catches Ctrl-C / SIGTERM while `train` runs
        self.saved_step = None  # the step checkpoint.pt holds

    # ------------------------------------------------------------------------ set up

    def setup(self):
        """Data, model, optimizer and schedule, the log; the checkpoint's state under --resume."""
        check_output_dir(self.config.run)  # an earlier run there needs --resume or --overwrite
        optim = self.config.optim
        seed_everything(optim.seed)
        if self.config.run.num_threads:
            torch.set_num_threads(self.config.run.num_threads)
        self.world, self.device = World.start(resolve_device(self.config.run.device))
        saved = self.saved_state()
        self.tokenizer = load_tokenizer(self.config.data.tokenizer)
        self.load_data()
        self.dtype = resolve_dtype(optim.dtype, self.device)
        self.raw_model = build_model(self.config, self.stage, len(self.tokenizer), quiet=not self.world.is_main)
        # The context the model learns, saved in its config.json: `serve` and `chat` default to it.
        model_config = self.raw_model.config
        model_config.max_seq_len = max(getattr(model_config, "max_seq_len", None) or 0, self.config.data.max_seq_len)
        self.raw_model.to(self.device).train()
        self.helpers = self.stage.make_helpers(self.raw_model, self.config, self.train_set)  # before resuming: the starting weights
        if self.config.model.compile:
            # compiles the decoder stack in place (parameter names, hence checkpoints, unchanged)
            core = self.raw_model.get_base_model() if hasattr(self.raw_model, "get_base_model") else self.raw_model
            core.model.compile()
        self.model = self.world.wrap(self.raw_model, fsdp=self.config.run.fsdp)  # what forward and backward go through
        if self.world.distributed:
            torch.manual_seed(optim.seed + self.world.rank)  # the same initial weights, its own dropout
        self.plan = Plan.make(len(self.train_set), optim, self.world.world_size)
        self.make_optimizer()
        self.progress = Progress()
        if self.world.is_main:
            self.start_output_dir()
        self.world.barrier()
        self.log = MetricsLog(self.output_dir, self.config.run.report_to, enabled=self.world.is_main)
        if saved is not None:
            self.resume(saved)
        else:
            self.log.start_afresh()
        if self.world.is_main:
            save_run_config(self.config, self.output_dir / RUN_CONFIG_NAME)
        self.timeline = Timeline(count_workload(self, count_tokens=False), self.progress.global_step,
                                 self.raw_model)

    def start_output_dir(self):
        """--output_dir made; under --overwrite, emptied of the earlier run first (only now that data and
        model are ready, so that a mistake in them leaves the earlier run in place)."""
        if self.config.run.overwrite:
            removed = remove_earlier_run(self.output_dir)
            if removed:
                self.say(f"--overwrite: deleted the earlier run in {self.output_dir} ({', '.join(removed)})")
        self.output_dir.mkdir(parents=True, exist_ok=True)

    def saved_state(self):
        """The checkpoint to continue from under --resume; None (with a notice) when there is none yet,
        so that the same command serves the first start and every restart."""
        if not self.config.run.resume:
            return None
        if not self.checkpoint_path.exists():
            self.say(f"--resume: no {CHECKPOINT_NAME} in {self.output_dir} yet; starting from the beginning.")
            return None
        return load_training_state(self.checkpoint_path)

    def load_data(self):
        """The stage (from the data's format unless --stage), the training set and the validation set."""
        data = self.config.data
        if data.data is None:
            data.data = [str(BUNDLED_DATA / "pretrain.jsonl")]
        paths = expand_paths(data.data)
        found = detect_format(paths)
        data.stage = data.stage or stage_for(found).name
        if found not in STAGES[data.stage].reads:
            raise UserError(f"--stage {data.stage} does not match the data: {paths[0]} holds {stage_for(found).name} "
                            f"records")
        self.stage = STAGES[data.stage]
        self.collate = partial(collate, rows=self.stage.rows)
        self.train_set = make_dataset(paths, found, self.tokenizer, data)
        self.say(f"Data: {self.train_set.describe()}")
        self.val_set = None
        if data.eval_data:
            eval_paths = expand_paths(data.eval_data)
            # another format than the stage reads: the training data's dataset says where, in a clear error
            eval_format = detect_format(eval_paths)
            eval_format = eval_format if eval_format in self.stage.reads else found
            self.val_set = make_dataset(eval_paths, eval_format, self.tokenizer, data)
            self.say(f"Data: {self.val_set.describe()}")
        elif data.val_fraction > 0:
            self.train_set, self.val_set = split_validation(self.train_set, data.val_fraction, self.config.optim.seed)
        if len(self.train_set) == 0:
            raise UserError(f"no training samples in {', '.join(map(str, paths))} (too short for --max_seq_len "
                            f"{data.max_seq_len}?)")
        if data.replay_data:
            self.train_set = self.with_replay(self.train_set, data)
        others = [*(data.eval_data or []), *(data.replay_data or [])]
        self.data_paths = paths + (expand_paths(others) if others else [])
        self.data_fingerprint = data_fingerprint(self.data_paths)  # the files' digests, known since preparing them
        self.val_batches = validation_batches(self.val_set, data.eval_max_tokens, self.config.optim.batch_size)

    def with_replay(self, train_set, data):
        """The training set with --replay_data's pretraining windows beside it (SFT only); the
        validation set stays the conversations'."""
        if self.stage.name != "sft":
            raise UserError(f"--replay_data mixes pretraining text into SFT; this run's stage is {self.stage.name}: "
                            f"drop --replay_data")
        paths = expand_paths(data.replay_data)
        found = detect_format(paths)
        if found is not TEXT:
            raise UserError(f"--replay_data takes pretraining text ({TEXT.fields} records); {paths[0]} holds "
                            f"{stage_for(found).name} records")
        replay = make_dataset(paths, found, self.tokenizer, data)
        self.say(f"Data: replayed {replay.describe()}")
        return Mixture([train_set, replay])

    def make_optimizer(self):
        optim = self.config.optim
        if optim.min_lr is None:
            optim.min_lr = optim.learning_rate / 10
        if optim.warmup_steps is None:
            optim.warmup_steps = max(1, round(0.02 * self.plan.total_steps))
        trainable = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for _, p in trainable if p.dim() >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for _, p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        # fused: one pass over each parameter's optimizer state instead of ~10 per-tensor passes
        self.optimizer = torch.optim.AdamW(groups, lr=optim.learning_rate, fused=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_schedule(optim.warmup_steps, self.plan.total_steps, optim.learning_rate, optim.min_lr))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    # ------------------------------------------------------------------------ the loop

    def run(self):
        """Set up, train until the planned number of steps, finish. Returns the process exit code:
        0, or 128 + the signal number when Ctrl-C / SIGTERM stopped the run (after a checkpoint, or
        at once on a second Ctrl-C: see StopRequested)."""
        try:
            self.setup()
            return self.train()
        except StoppedAtOnce as stopped:
            self.say(f"Stopped at once by a second {signal.Signals(stopped.signal).name}, without saving: "
                     f"{self.last_checkpoint()}")
            return 128 + stopped.signal
        finally:
            self.world.close()

    def last_checkpoint(self):
        """What a stopped run leaves to continue from, in words."""
        if self.saved_step is None:
            return "no checkpoint was written yet; the same command plus --resume starts the run again"
        return (f"{self.checkpoint_path} holds step {self.saved_step}; continue from there with the same command "
                f"plus --resume")

    def train(self):
        self.print_start()
        from tqdm import tqdm
        self.bar = tqdm(total=self.plan.total_steps, initial=self.progress.global_step, desc="training",
                        unit="step", dynamic_ncols=True, leave=False, file=sys.stderr,
                        disable=None if self.world.is_main else True)
        fresh = self.progress.global_step == 0 and self.progress.step_in_epoch == 0
        self.first_val = self.validate() if fresh else None
        self.last_val = self.first_val
        with self.stop:
            while self.progress.global_step < self.plan.total_steps and self.stop.signal is None:
                self.train_epoch()
                if self.stop.signal is None:
                    self.end_epoch()
            if self.stop.signal is not None and self.saved_step != self.progress.global_step:
                self.save()  # still under the handler: a second Ctrl-C meanwhile lets it finish
        self.bar.close()
        self.bar = None
        if self.stop.signal is not None:
            self.log.close()
            self.say(f"Stopped by {signal.Signals(self.stop.signal).name}. Checkpoint saved to {self.checkpoint_path} "
                     f"(step {self.saved_step}); continue with the same command plus --resume.")
            return 128 + self.stop.signal
        try:
            self.finish()
        except KeyboardInterrupt:  # Ctrl-C while the final files are written: the training itself is done
            self.say(f"Interrupted while writing the final model; training is complete and "
                     f"{self.last_checkpoint()}, which only writes the final files.")
            return 130
        return 0

    def train_epoch(self):
        """The optimizer steps of one epoch (the rest of it, after a resume), until the plan's end."""
        epoch = self.progress.epoch
        steps = epoch_steps(self.train_set, self.plan.global_batch, self.config.optim.seed, epoch)
        todo = steps[self.progress.step_in_epoch:self.plan.steps_in_epoch(epoch)]
        micro = self.config.optim.batch_size * self.world.world_size
        # each step: micro-batches of batch_size x ranks samples, each split between the ranks (a rank
        # left without a sample loads one, weighted 0); made as they are loaded, not for the whole epoch
        shards = (self.world.shard(part) or step[:1] for step in todo for part in micro_batches_of(step, micro))
        batches = iterate_batches(self.train_set, shards, self.collate, self.config.data.num_workers, self.device)
        self.window_tokens, self.window_start = 0, time.perf_counter()
        for step in todo:
            parts = micro_batches_of(step, micro)
            micro_batches = [next(batches) for _ in parts]
            empty = [not self.world.shard(part) for part in parts]
            metrics = self.step(micro_batches, empty)
            self.window_tokens += metrics.pop("tokens")
            self.after_step(metrics)
            if self.stop.signal is not None:
                return

    def step(self, micro_batches, empty=None):
        """One optimizer step over this rank's micro-batches: forward and backward, each loss a sum over
        the stage's items divided by their number in the whole step (all ranks), then clip, update,
        advance the schedule. `empty[i]`: this rank has no sample in micro-batch i (it runs one with
        weight 0, so that every rank takes part in each gradient exchange). Returns the step's
        metrics, summed over ranks (the loss: the mean over all the step's items)."""
        empty = empty or [False] * len(micro_batches)
        counts = [0 if skip else self.stage.count(batch) for batch, skip in zip(micro_batches, empty)]
        normalizer = self.world.sum([sum(counts)], self.device)[0] or 1
        metrics, bad_loss = {}, 0.0
        for index, (batch, skip) in enumerate(zip(micro_batches, empty)):
            with self.world.no_sync(self.model, last=index == len(micro_batches) - 1), self.autocast():
                loss, batch_metrics = self.stage.loss(self.model, batch, normalizer, self.helpers)
                if not torch.isfinite(loss):
                    bad_loss = loss.item()
                    loss = loss.nan_to_num(0.0, 0.0, 0.0)  # every rank must still take part in backward
                # DDP and FSDP average gradients over ranks; each rank's loss is its part of the sum
                self.scaler.scale(loss * (0.0 if skip else self.world.world_size)).backward()
            for name, value in batch_metrics.items():
                metrics[name] = metrics.get(name, 0.0) + (0.0 if skip else float(value))
        tokens = sum(int(batch["attention_mask"].sum()) for batch, skip in zip(micro_batches, empty) if not skip)
        names = sorted(metrics)
        summed = self.world.sum([metrics[n] for n in names] + [tokens, float(bad_loss != 0.0),
                                                               float(self.stop.signal is not None)], self.device)
        metrics = dict(zip(names, summed))
        if summed[-2]:
            self.diverged(f"the loss became {bad_loss if bad_loss else 'nan or inf on another rank'}")
        if summed[-1] and self.stop.signal is None:
            self.stop.signal = signal.SIGTERM  # another rank was asked to stop: stop together
        if self.config.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                           self.config.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        tokens = int(summed[-3])  # all ranks'
        progress = self.progress
        progress.step_in_epoch += 1
        progress.global_step += 1
        progress.tokens += tokens
        progress.epoch_loss_sum += metrics["loss"]
        progress.epoch_loss_count += 1
        return {**metrics, "tokens": tokens}

    def after_step(self, metrics):
        """Log, validate and checkpoint when the schedule says so (schedule.due_after)."""
        step = self.progress.global_step
        self.bar.update(1)
        forecast = self.timeline.step_done(step)
        if forecast:
            self.say(forecast)
        due = due_after(self.plan, self.config.run, step)
        if due.log:
            self.log_step(metrics, self.progress.step_in_epoch, self.plan.steps_in_epoch(self.progress.epoch))
        if due.validate:
            self.last_val = self.validate()
        if due.checkpoint:
            self.save()

    def log_step(self, metrics, step_in_epoch, epoch_steps):
        elapsed = time.perf_counter() - self.window_start
        tokens_per_s = self.window_tokens / max(elapsed, 1e-9)
        progress = self.progress
        average = progress.epoch_loss_sum / progress.epoch_loss_count
        lr = self.scheduler.get_last_lr()[0]
        extra = "".join(f", {name}: {value:.4f}" for name, value in metrics.items() if name != "loss")
        self.say(f"Epoch [{progress.epoch + 1}/{self.plan.epochs}], Step [{step_in_epoch}/{epoch_steps}], "
                 f"Loss: {metrics['loss']:.4f}, Avg Loss: {average:.4f}{extra}, LR: {lr:.2e}, Tokens/s: {tokens_per_s:.0f}, "
                 f"ETA: {self.timeline.time_left(progress.global_step)}")
        self.log.write({"step": progress.global_step, "epoch": progress.epoch + 1, **metrics, "lr": lr,
                        "tokens_per_s": round(tokens_per_s, 1), "tokens": progress.tokens})
        self.window_tokens, self.window_start = 0, time.perf_counter()

    def end_epoch(self):
        """After an epoch (or the last steps of --max_steps): validate, the epoch's model file when due
        (schedule.due_after), a checkpoint."""
        due = due_after(self.plan, self.config.run, self.progress.global_step)
        epoch = self.progress.epoch + 1
        if due.epoch_complete:  # else --max_steps ended the run mid-epoch: a longer --max_steps continues it there
            self.progress = Progress(epoch=epoch, global_step=self.progress.global_step,
                                     tokens=self.progress.tokens)
        self.last_val = self.validate()
        if due.epoch_file:
            self.save_epoch_model(epoch)
        self.save()

    @timed("epoch_file")
    def save_epoch_model(self, epoch):
        """model_epoch_N.pth, float16 (a snapshot to sample from or go back to; checkpoint.pt resumes)."""
        path = self.output_dir / f"model_epoch_{epoch}.pth"
        model = self.full_model()
        if self.world.is_main:
            save_original_format(model, path, dtype=torch.float16)
            self.say(f"Model saved to: {path} ({describe_size(path)})")
            self.remove_old_epoch_files()
        self.world.barrier()

    def remove_old_epoch_files(self):
        """--save_total_limit: keep the newest N model_epoch_N.pth files."""
        limit = self.config.run.save_total_limit
        files = sorted(self.output_dir.glob("model_epoch_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        for old in files[:-limit] if limit else []:
            old.unlink()

    # ------------------------------------------------------------------------ validation

    @timed("validation")
    @torch.no_grad()
    def validate(self):
        """The stage's loss over the (capped) validation set, each item weighing the same; in eval mode.
        Each rank scores its share of every batch; the sums are added over ranks."""
        if not self.val_batches:
            return None
        was_training = self.model.training
        self.model.eval()
        # A rank whose share of a batch is empty still runs its first sample and counts nothing from
        # it, as training does: under FSDP every forward gathers the parameters from all the ranks.
        shards = [self.world.shard(indices) for indices in self.val_batches]
        batches = [load_batch(self.val_set, shard or indices[:1], self.collate, self.device)
                   for indices, shard in zip(self.val_batches, shards)]
        counted = [bool(shard) for shard in shards]
        normalizer = self.world.sum([sum(self.stage.count(batch) for batch, used in zip(batches, counted) if used)],
                                    self.device)[0] or 1
        totals = {}
        for batch, used in zip(batches, counted):
            with self.autocast():
                _, metrics = self.stage.loss(self.raw_model, batch, normalizer, self.helpers)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + (float(value) if used else 0.0)
        self.model.train(was_training)
        names = sorted(set().union(*self.world.gather(sorted(totals))))  # a rank without batches has none
        totals = dict(zip(names, self.world.sum([totals.get(name, 0.0) for name in names], self.device)))
        result = {f"val_{name}": value for name, value in totals.items()}
        if self.stage.perplexity:
            result = {"val_loss": result["val_loss"], "val_ppl": math.exp(min(result["val_loss"], 50))}
        self.log.write({"step": self.progress.global_step, "epoch": self.progress.epoch + 1, **result})
        shown = ", ".join(f"{name}: {value:.4f}" for name, value in result.items())
        self.say(f"Validation at step {self.progress.global_step}: {shown}")
        return result

    # ------------------------------------------------------------------------ checkpoints

    @timed("checkpoint")
    def save(self):
        """checkpoint.pt: everything --resume needs, written by rank 0 while the others wait. Never
        overwrites the last good one with weights that overflowed."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters() if p.requires_grad):
            self.diverged("the weights became inf or nan")
        with self.stop.saving():  # a second Ctrl-C now lets the save finish
            self.progress.metrics_rows = self.log.rows
            model_state, optimizer_state = self.training_states()
            rng_states = self.world.gather(rng_state(self.device))
            has_state = hasattr(self.helpers, "state_dict")  # e.g. GRPO's sampling generator
            helper_states = self.world.gather(self.helpers.state_dict()) if has_state else None
            if self.world.is_main:
                save_training_state(self.checkpoint_path, {
                    "model": model_state, "optimizer": optimizer_state, "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict(), "rng": rng_states[0], "rng_per_rank": rng_states,
                    "progress": asdict(self.progress), "run_config": {**self.config.flags(), "world_size":
                                                                      self.world.world_size},
                    "data_fingerprint": self.data_fingerprint,
                    **({"helpers_per_rank": helper_states} if helper_states else {}),  # e.g. GRPO's sampling generator
                })
            self.saved_step = self.progress.global_step
            self.world.barrier()

    def training_states(self):
        """The weights a checkpoint holds (all, or the adapters under LoRA) and the optimizer's state,
        whole on rank 0 even when FSDP shards them."""
        if self.config.run.fsdp and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                                 get_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=options),
                    get_optimizer_state_dict(self.model, self.optimizer, options=options))
        model_state = {k: v.detach().cpu().clone() for k, v in trainable_state(self.raw_model).items()}
        return model_state, self.optimizer.state_dict()

    def resume(self, saved):
        """Continue exactly where the checkpoint stopped: weights, optimizer, schedule, RNG, data position."""
        self.check_same_run(saved)
        if self.config.run.fsdp and self.world.distributed:
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)
            options = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, saved["model"], options=options)
            set_optimizer_state_dict(self.model, self.optimizer, saved["optimizer"], options=options)
        else:
            if getattr(self.raw_model, "peft_config", None):
                load_adapter_state(self.raw_model, saved["model"])
            else:
                load_weights(self.raw_model, saved["model"], source=str(self.checkpoint_path))
            self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        if saved["scaler"]:  # empty when the checkpoint's run had no float16 scaler: a new one starts afresh
            self.scaler.load_state_dict(saved["scaler"])
        per_rank = saved.get("rng_per_rank", [saved["rng"]])
        if self.world.rank < len(per_rank):  # with more ranks than before, the new ones keep their fresh seed
            set_rng_state(per_rank[self.world.rank], self.device)
        helper_states = saved.get("helpers_per_rank", [])
        if self.world.rank < len(helper_states):
            self.helpers.load_state_dict(helper_states[self.world.rank])
        progress = dict(saved["progress"])
        if "batch" in progress:  # a checkpoint that counted micro-batches
            progress["step_in_epoch"] = progress.pop("batch") // self.config.optim.accumulation_steps
        self.progress = Progress(**{k: v for k, v in progress.items() if k in Progress.__dataclass_fields__})
        self.log.truncate(self.progress.global_step, progress.get("metrics_rows"))
        self.saved_step = self.progress.global_step
        self.say(f"Resuming from {self.checkpoint_path}: epoch {self.progress.epoch + 1}, step {self.progress.global_step}")

    def check_same_run(self, saved):
        """Refuse a resume whose flags or data would train something else than the checkpoint's run;
        more --epochs or --max_steps (and logging, saving, device settings) may change, and so may the
        number of ranks and the per-rank batch when the global batch stays the same."""
        before, now = saved.get("run_config", {}), self.config.flags()
        problems = [f"--{name} {before[name]!r} -> {now[name]!r}" for name in MUST_MATCH_ON_RESUME
                    if name in before and before.get(name) != now[name]]
        ranks = before.get("world_size", 1)
        was = before.get("batch_size", now["batch_size"]) * ranks * before.get("accumulation_steps", 1)
        if was != self.plan.global_batch:
            problems.append(f"the global batch (--batch_size x ranks x --accumulation_steps) {was} "
                            f"({before.get('batch_size')} x {ranks} x {before.get('accumulation_steps')}) -> "
                            f"{self.plan.global_batch} ({now['batch_size']} x {self.world.world_size} x "
                            f"{now['accumulation_steps']})")
        known = saved.get("data_fingerprint")
        if known not in (None, self.data_fingerprint) and known != contents_digest(self.data_paths)[:32]:
            problems.append("the data files' contents")
        if problems:
            raise UserError(f"--resume: {'; '.join(problems)} differ from the run in {self.checkpoint_path}; "
                            f"resume with the same values and data (a global batch may be split differently "
                            f"between ranks and accumulation), or start a new run in another --output_dir")

    # ------------------------------------------------------------------------ the end

    def unsharded_model(self):
        """The model as it trains (with its LoRA adapters), whole: FSDP's shards gathered into a copy
        on rank 0, which all ranks must call for (None on the others); else the model itself."""
        if not (self.config.run.fsdp and self.world.distributed):
            return self.raw_model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.world.is_main:
            return None
        model = MiniMindForCausalLM(self.raw_model.config)
        if self.config.lora.enabled:  # the state has peft's names: load it into the same adapters
            model = add_lora(model, self.config.lora)
            model.load_state_dict(state)
        else:
            load_weights(model, state, source="the sharded model")
        return model

    def full_model(self):
        """The plain model to save (LoRA merged into a copy; under FSDP built on rank 0, None on the others)."""
        model = self.unsharded_model()
        return export_model(model) if model is not None else None

    def finish(self):
        """The final model in the original format and as a Hugging Face directory, the loss plot,
        a sample generation, what was written."""
        trained = self.unsharded_model()
        if not self.world.is_main:
            self.world.barrier()
            return
        final_model = export_model(trained)
        final_pth = self.output_dir / "model_final.pth"
        save_original_format(final_model, final_pth)
        written = [final_pth, self.output_dir / "config.json",
                   save_model_directory(final_model, self.tokenizer, self.output_dir / "final")]
        if getattr(trained, "peft_config", None):
            save_adapter(trained, self.output_dir / "adapter")
            written.append(self.output_dir / "adapter")
        self.log.close()
        written.append(self.log.path)
        if self.log.tensorboard is not None:
            written.append(self.output_dir / "tensorboard")
        png = plot_losses(self.log.path, self.output_dir / "loss.png")
        written += [png] if png else []
        written += [self.output_dir / RUN_CONFIG_NAME, self.checkpoint_path]
        if self.first_val and self.last_val:
            name = self.stage.headline
            print(f"Validation {name}: {self.first_val[f'val_{name}']:.4f} at the start -> "
                  f"{self.last_val[f'val_{name}']:.4f} at the end")
        if self.config.run.sample_tokens:
            sample_set = self.val_set if self.val_set is not None and len(self.val_set) else self.train_set
            rows, _ = self.stage.rows([sample_set[0]])
            print_sample(final_model, self.tokenizer, self.stage.sample_prompt(rows[0]), self.config.run.sample_tokens)
        print(f"Trained {self.progress.tokens:,} tokens in {self.progress.global_step} optimizer steps.")
        print(f"Training complete! Final model saved to: {final_pth}")
        peak = peak_memory(self.device)
        if peak:
            print(f"Peak memory: {peak}")
        written += sorted(self.output_dir.glob("model_epoch_*.pth"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        # this run's files only: the folder may hold others (data, notes, the outputs of other runs)
        print(f"Written ({size_text(sum(map(size_of, written)))} in {self.output_dir}):")
        for path in written:
            print(f"  {path} ({describe_size(path)})")
        self.world.barrier()

    # ------------------------------------------------------------------------ helpers

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def say(self, text):
        """A log line (rank 0 only) that does not tear the progress bar."""
        if not self.world.is_main:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text)

    def diverged(self, what):
        last_good = self.checkpoint_path if self.checkpoint_path.exists() else "not written yet"
        raise UserError(f"training diverged at step {self.progress.global_step + 1} (epoch {self.progress.epoch + 1}): "
                        f"{what}; the last good checkpoint is {last_good}. Lower --learning_rate, "
                        f"or use --dtype float32 / bfloat16, then --resume")

    def print_start(self):
        if not self.world.is_main:
            return
        print_banner(self.config, self.raw_model, self.stage.name, self.device, self.dtype)
        val_size = len(self.val_set) if self.val_set is not None else 0
        print(f"Data: {len(self.train_set)} training samples, {val_size} validation samples")
        sources = {id(getattr(d, "dataset", d)): getattr(d, "dataset", d)
                   for part in (self.train_set, self.val_set) if part for d in getattr(part, "parts", [part])}
        for dataset in sources.values():  # a held-out split shares its dataset with the training set
            if dataset.stats:
                print(f"Data: {dataset.stats.describe()}")
        if self.world.distributed:
            optim = self.config.optim
            sharding = "FSDP (sharded parameters, gradients and optimizer state)" if self.config.run.fsdp \
                else "DistributedDataParallel"
            print(f"Ranks: {self.world.world_size} ({sharding}, {torch.distributed.get_backend()}); global batch "
                  f"{self.plan.global_batch} = {optim.batch_size} per rank x {self.world.world_size} ranks x "
                  f"{optim.accumulation_steps} accumulation")
        if self.val_batches:
            used = sum(len(batch) for batch in self.val_batches)
            if used < val_size:
                print(f"Validation uses {used} of {val_size} samples (--eval_max_tokens "
                      f"{self.config.data.eval_max_tokens}); the same ones each time")
        epochs = self.plan.epochs
        print(f"Training for {epochs} epoch{'s' if epochs != 1 else ''} ({self.plan.total_steps} optimizer steps)...")


# ---------------------------------------------------------------------------- the pieces


def seed_everything(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def save_run_config(config, path):
    """Every flag of the run; `python train.py --config PATH` reproduces it."""
    values = {name: value for name, value in sorted(config.flags().items())
              if name not in ("resume", "overwrite", "dry_run")}
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml.safe_dump(values, sort_keys=True, allow_unicode=True)))


def to_device(batch, device):
    """The batch's tensors moved to the device; anything else (GRPO's records) as it is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def load_batch(dataset, indices, collate, device):
    return to_device(collate([dataset[i] for i in indices]), device)


def iterate_batches(dataset, batch_lists, collate, num_workers, device):
    """Batches in the given order, made by `collate` (the stage's); with num_workers, by worker processes."""
    if num_workers == 0:
        for indices in batch_lists:
            yield load_batch(dataset, indices, collate, device)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_lists, collate_fn=collate,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield to_device(batch, device)


def resolve_dtype(name, device):
    """--dtype: auto is bfloat16 on a GPU with bfloat16 units, float16 (with the loss scaler) on an
    older one (T4, V100), float32 on a CPU or Apple GPU."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if native_bfloat16(device) else torch.float16
        return torch.float32
    return getattr(torch, name)


def build_model(config, stage, tokenizer_vocab, quiet=False):
    """A fresh model of the flags' shape, or the --pretrained_path weights (shape from the checkpoint,
    overridden only by the architecture flags actually given); LoRA adapters on top with --lora_rank.
    A fresh model's vocabulary is the tokenizer's unless --vocab_size says otherwise."""
    settings = config.model
    given = settings.architecture_overrides()
    dropout = {"dropout": stage.default_dropout if settings.dropout is None else settings.dropout,
               "attention_dropout": settings.attention_dropout}
    if settings.pretrained_path:
        path = Path(settings.pretrained_path)
        model_config = load_config(path, **given) if path.exists() else None
        model = load_model(path, config=model_config)
        model.config.update(dropout)
        model = rebuild_with_config(model)  # modules read dropout rates when they are built
    else:
        if "vocab_size" not in given:
            given["vocab_size"] = tokenizer_vocab
            if not quiet:
                print(f"Vocabulary: {tokenizer_vocab} tokens, the tokenizer's (--vocab_size to choose another size)")
        elif given["vocab_size"] > tokenizer_vocab and not quiet:
            print(f"Note: --vocab_size {given['vocab_size']} is larger than the tokenizer's {tokenizer_vocab} tokens; "
                  f"the other {given['vocab_size'] - tokenizer_vocab} embedding rows will never be used")
        try:
            model = MiniMindForCausalLM(MiniMindConfig(**{**dropout, **given}))
        except ValueError as error:
            raise UserError(str(error)) from None
    if tokenizer_vocab > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer_vocab} tokens but the model's vocabulary is "
                        f"{model.config.vocab_size}; pass --vocab_size {tokenizer_vocab} or a matching --tokenizer")
    model.model.gradient_checkpointing = settings.gradient_checkpointing
    if config.lora.enabled:
        model = add_lora(model, config.lora)
    return model


def rebuild_with_config(model):
    """A model whose config changed in a field that modules read at build time (dropout)."""
    fresh = MiniMindForCausalLM(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def trainable_state(model):
    """What a checkpoint must hold of the model: all weights, or only the adapters under LoRA."""
    if getattr(model, "peft_config", None):
        return adapter_state_dict(model)
    return model.state_dict()


class StopRequested:
    """Ctrl-C / SIGTERM set a flag; the loop saves a checkpoint after the current step and exits.

    A second one while the step finishes stops at once (StoppedAtOnce), without saving: the last
    checkpoint stays as it was. A second one while a checkpoint is being saved lets the save finish
    (it is written under a temporary name and renamed, so nothing is ever half-written)."""

    def __init__(self, say):
        self.say = say
        self.signal = None
        self.previous = {}
        self.in_save = False

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            self.say(f"{name} received: saving a checkpoint after this step (again: stop at once, without it)...")
        elif self.in_save:
            self.say(f"{name} again: the checkpoint is being written; finishing it first...")
        else:
            raise StoppedAtOnce(signum)

    @contextmanager
    def saving(self):
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class StoppedAtOnce(BaseException):
    """A second Ctrl-C / SIGTERM before the checkpoint's save began. A BaseException, like
    KeyboardInterrupt, so that no `except Exception` on the way holds it up."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signal = signum


def save_original_format(model, path, dtype=None):
    """A .pth state dict as the original MiniMind writes it, and config.json beside it so that
    load_model / --pretrained_path know its shape."""
    save_state_dict(model, path, dtype)
    config_json = model.config.to_json_string()
    atomic_write(Path(path).parent / "config.json", lambda tmp: Path(tmp).write_text(config_json))


def describe_size(path):
    """'45 MB': a file's size, or everything under a folder."""
    return size_text(size_of(path))


def size_of(path):
    """Bytes of a file, or of every file under a folder."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_model(model):
    """The plain model to save: LoRA adapters merged into a copy when present."""
    if getattr(model, "peft_config", None):
        return merged_copy(model)
    return model


def print_sample(model, tokenizer, prompt_ids, max_new_tokens):
    """A short greedy continuation from the trained model, so the user sees what it learned; the
    prompt is the stage's choice (Stage.sample_prompt: a text's first tokens, a conversation's prompt)."""
    model.eval()
    out = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, temperature=0, tokenizer=tokenizer)
    print("Sample (greedy):")
    print(f"  prompt: {tokenizer.decode(prompt_ids)!r}")
    print(f"  output: {out.texts[0]!r}")
