"""Knowledge distillation: a student learns a teacher's whole next-token distribution.

    loss = CE(student, next tokens) + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))

over the labelled tokens; training/distill.py has the KL and loads the teacher (frozen, with the
student's tokenizer). Records: pretraining text or SFT conversations, whichever the files hold
(data/records.py TEXT, CONVERSATIONS). `minimind eval` measures a distilled model as the stage its
file implies does (perplexity on text, exact match on conversations).
"""
from dataclasses import dataclass

from ...data.records import CONVERSATIONS, TEXT
from ...errors import UserError
from ...settings import setting
from .stage import Stage


@dataclass
class DistillSettings:
    """Knowledge distillation (distill.py): the student learns the teacher's next-token distribution."""
    teacher: str = setting("", "the teacher model (same tokenizer as the student); needed by --stage distill")
    distill_temperature: float = setting(1.0, "softmax temperature T of the teacher and the student in the KL term",
                                         low=0, high=100, low_open=True)
    distill_alpha: float = setting(1.0, "weight of the KL term: loss = CE + alpha * T^2 * KL(teacher || student)",
                                   low=0, high=1e6)


def loss(model, batch, normalizer, helpers):
    from ..distill import distill_loss  # torch-side: `train --help` reads this module without loading torch
    return distill_loss(model, batch, normalizer, helpers)


def make_helpers(model, config, train_set):
    from ..distill import load_teacher  # torch-side: `train --help` reads this module without loading torch
    settings = config.distill
    return {"teacher": load_teacher(settings.teacher, model, config.data.tokenizer),
            "temperature": settings.distill_temperature, "alpha": settings.distill_alpha}


def check(config, chosen):
    if chosen and not config.distill.teacher:
        raise UserError(f"--stage {STAGE.name} needs --teacher, the model whose predictions the student learns")
    if config.distill.teacher and not chosen:
        raise UserError(f"--teacher is for distillation; add --stage {STAGE.name}")


def input_paths(config):
    return [("--teacher", config.distill.teacher)]


STAGE = Stage("distill", "distillation", reads=(TEXT, CONVERSATIONS), loss=loss, make_helpers=make_helpers,
              settings=DistillSettings, settings_title="distillation",
              resume_flags=("teacher", "distill_temperature", "distill_alpha"), check=check, input_paths=input_paths)
