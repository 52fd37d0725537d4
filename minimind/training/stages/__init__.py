"""The training stages: one module each, and the table below that everything else reads.

    stage     records it reads        loss                                     also needs
    pretrain  text                    next-token cross-entropy, every token    -
    sft       conversations           next-token cross-entropy, answers only   -
    dpo       preference pairs        sigmoid DPO loss on response log-probs   a frozen reference
    orpo      preference pairs        SFT loss on the chosen answer + lambda   -
                                      x odds ratio of chosen to rejected
    grpo      prompts + answers       clipped policy gradient on sampled       a frozen reference, rewards,
                                      answers + KL to the reference            a sampling generator
    distill   text or conversations   cross-entropy + KL to the teacher's      a frozen teacher
                                      next-token distribution

A stage's module holds what is about it: its flags (a settings dataclass) and which of them a
--resume must keep, the records it reads and how they become a batch, its loss, what it needs beside
the model, what `minimind eval` measures on its records, and the prompt of the sample a run prints
(stage.py says what an entry holds). The table is read by the trainer, TrainConfig's flag groups and
the --stage choices (config.py), the resume check (trainer.py) and `minimind eval`
(inference/evaluation.py). Which parameters train is not a property of the stage: all of them, or only
LoRA adapters with --lora_rank (any stage).

Adding a stage is one module and one line in STAGES (docs/training_guide.md, "Adding a stage").
"""
from ...data.records import detect_format
from . import distill, dpo, grpo, orpo, pretrain, sft

# In this order: the --stage choices, the flag groups of --help, and the stage a file implies (below).
STAGES = {stage.name: stage for stage in (pretrain.STAGE, sft.STAGE, dpo.STAGE, orpo.STAGE, grpo.STAGE,
                                                 distill.STAGE)}


def stage_for(record_format):
    """The stage that a file of these records trains when --stage is not given: the first that reads them."""
    return next(stage for stage in STAGES.values() if record_format in stage.reads)


def detect_stage(paths):
    """The name of the stage the data implies (the format of its first good record)."""
    return stage_for(detect_format(paths)).name


def resume_flags():
    """Every stage's flags that a --resume must keep (a run carries them all, whichever its stage)."""
    return tuple(flag for stage in STAGES.values() for flag in stage.resume_flags)


def check_flags(config):
    """Each stage's checks of flags that involve it (--teacher needs --stage distill, and back)."""
    for stage in STAGES.values():
        if stage.check:
            stage.check(config, chosen=config.data.stage == stage.name)
