"""`python train.py` / `minimind train`: flags (or a --config file) into a TrainConfig, then the run.

Every flag is a field of the library's typed settings (training/config.py), checked as it is read;
`--dry_run` forecasts the run instead of training (training/dry_run.py).
"""
import os
import sys
from dataclasses import fields

from ..errors import UserError
from ..training.config import GROUPS, TrainConfig, check_combinations
from ..training.output_dir import check_output_dir
from ..training.stages import STAGES
from . import inputs
from .flags import Parser, add_settings, from_namespace, read_config_file
from .main import main as run_verb

TITLES = [stage.title for stage in STAGES.values()]
HELP = f"train a model ({', '.join(TITLES)}, LoRA); same as python train.py"


def parser(prog="train.py"):
    parser = Parser(prog=prog, description=f"Train a MiniMind model: {', '.join(TITLES[:-1])} or {TITLES[-1]}, "
                                           f"from scratch or from weights.")
    for _, settings, title in GROUPS:
        add_settings(parser.add_argument_group(title), settings)
    parser.add_argument("--config", default=None, help="a YAML or JSON file of flag values; flags on the command "
                                                       "line win [none]")
    return parser


def parse(argv, prog="train.py"):
    """Flags (and --config FILE) -> TrainConfig, every value checked; cross-flag checks too."""
    flags = parser(prog)
    namespace = flags.parse_args(argv)
    if namespace.config:
        flags.set_defaults(**read_config_file(namespace.config, flags))
        namespace = flags.parse_args(argv)
    config = TrainConfig(**{part.name: from_namespace(part.default_factory, namespace)
                            for part in fields(TrainConfig)})
    check_combinations(config)
    return config


def check(config):
    """The inputs exist and --output_dir holds no earlier run (unless --resume / --overwrite), before
    torch loads."""
    data, model = config.data, config.model
    inputs.data_files("--data", data.data)
    inputs.data_files("--eval_data", data.eval_data)
    inputs.data_files("--replay_data", data.replay_data)
    inputs.must_exist("--pretrained_path", model.pretrained_path)
    inputs.tokenizer("--tokenizer", data.tokenizer)
    for stage in STAGES.values():  # a stage's own files: distillation's --teacher, GRPO's --reward file.py
        for flag, path in stage.input_paths(config) if stage.input_paths else ():
            inputs.must_exist(flag, path)
    check_output_dir(config.run)


def run(config):
    """Run the training that a TrainConfig describes (or only forecast it, --dry_run); returns the
    exit code (see Trainer.run)."""
    # torch and the model code load here, after the flags were checked (--help stays instant)
    if config.run.dry_run:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("--dry_run forecasts a run of one process: run it without torchrun "
                            "(a run over N ranks takes about 1/N of its steps' time per rank, plus the gradient exchange)")
        from ..training.dry_run import dry_run
        return dry_run(config)
    from ..training.trainer import Trainer
    return Trainer(config).run()


def main(argv=None):
    """`python train.py` from Python: flags in, exit code out."""
    return run_verb(["train", *(sys.argv[1:] if argv is None else argv)], prog="train.py")
