"""The `minimind` command: one entry point with verbs, each a thin layer over the library.

    minimind train ...        (same as python train.py)
    minimind tokenizer train ...
    minimind generate | chat | eval | merge | export | serve ...

Each verb is a module here (commands/VERB.py) with `HELP`, `parser()` (or `parse()`, for train:
flags into its typed config), `check(args)` (the files its flags name exist: commands/inputs.py)
and `run(args)`. Flags and files are checked before the library is imported: `--help`, a bad value
and a missing file answer at once, without loading torch. A UserError from the library becomes one
clear line and exit code 2; Ctrl-C, exit code 130.
"""
import importlib
import os
import sys

from ..errors import UserError

VERBS = ("train", "tokenizer", "generate", "chat", "eval", "merge", "export", "serve")


def verb_module(verb):
    return importlib.import_module(f"minimind.commands.{verb}")


def parse(verb, argv, prog=None):
    """A verb's flags, checked: a TrainConfig for train, an argparse namespace for the others."""
    module = verb_module(verb)
    prog = prog or f"minimind {verb}"
    if hasattr(module, "parse"):
        return module.parse(argv, prog=prog)
    return module.parser(prog).parse_args(argv)


def usage():
    lines = ["usage: minimind VERB [options]   (minimind VERB --help for details)", "", "verbs:"]
    lines += [f"  {verb:<10} {verb_module(verb).HELP}" for verb in VERBS]
    return "\n".join(lines)


def check(verb, arguments):
    """What can be checked before torch loads, beyond each flag's value: the files they name."""
    module = verb_module(verb)
    if hasattr(module, "check"):
        module.check(arguments)
    return arguments


def run_user_command(function, argument, keep_result=False, quiet=False):
    """Run a command; a UserError becomes one line on stderr (none when `quiet`) and its exit code
    (2; 130 for work that Ctrl-C stopped)."""
    try:
        result = function(argument)
    except UserError as error:
        if not quiet:
            print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    return result if keep_result else result or 0


def main(argv=None, prog=None):
    """`minimind VERB ...`; train.py calls it with prog="train.py"."""
    argv = sys.argv[1:] if argv is None else list(argv)
    set_openmp_waiting(argv[0] if argv else None)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"error: unknown verb '{verb}'\n\n{usage()}", file=sys.stderr)
        return 2
    # Flags and files first, so that --help, a bad value and a missing file answer before torch is
    # imported. Every rank of a torchrun job finds the same mistake there: rank 0 alone says it.
    quiet = os.environ.get("RANK", "0") != "0"
    arguments = run_user_command(lambda argv: check(verb, parse(verb, argv, prog)), rest, keep_result=True,
                                 quiet=quiet)
    if isinstance(arguments, int):
        if quiet and arguments:
            wait_for_rank_0()
        return arguments
    try:
        import transformers
        transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars are noise in our output
        return run_user_command(verb_module(verb).run, arguments)
    except KeyboardInterrupt:  # a verb that stops cleanly on Ctrl-C (train, chat) catches it itself
        print("\ninterrupted", file=sys.stderr)
        return 130


DECODING_VERBS = ("generate", "chat", "eval", "serve")


# How many turns a waiting OpenMP thread spins before it sleeps (GOMP_SPINCOUNT).
DECODING_SPIN = "10000"  # a fraction of a millisecond: a decoding step is ~400 short products
TRAINING_SPIN = "1000"  # a few microseconds: the gaps between a training step's products


def set_openmp_waiting(verb):
    """How torch's OpenMP threads wait for work, set before torch starts its pool; a value the user
    exported (OMP_WAIT_POLICY or GOMP_SPINCOUNT) wins. OpenMP's default spins for a long while (300,000
    turns): on a busy machine the spinning threads take the cores the working ones need, and a 2-thread
    training step ran 2-5x slower than a 1-thread one (docs/benchmarks.md, "A busy CPU"). Sleeping at
    once (OMP_WAIT_POLICY=PASSIVE, the choice here until 2026-12-07) costs a wake-up for every product
    instead: the CPU session's pretraining ran up to 14% slower on an idle 2-core Xeon. Training and
    the other commands spin TRAINING_SPIN turns, about the gap between a step's products, then sleep:
    beside a busy process as fast as PASSIVE at the CPU session's and the default shape. The verbs
    that decode spin longer (DECODING_SPIN): waking a sleeping thread for each of a step's short
    products made a row decode at 57 tokens/s instead of 104, and each decoding step runs on fewer
    threads whenever that has been faster, as on a busy machine (inference/threads.py, ThreadPolicy;
    docs/serving.md, "Threads")."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = DECODING_SPIN if verb in DECODING_VERBS else TRAINING_SPIN


RANK_0_GRACE_SECONDS = 60


def wait_for_rank_0():
    """A rank other than 0 that found a mistake in the flags leaves after rank 0, which says it: when
    a rank fails, torchrun stops the others, and rank 1 leaving first could stop rank 0 before its
    line was printed (seen on a loaded machine). Rank 0 finds the same mistake and fails within
    seconds, and torchrun then stops this one; the wait ends by itself if it does not."""
    import time

    time.sleep(RANK_0_GRACE_SECONDS)


def exit_process(code):
    """Leave the process with `code`. A torchrun worker leaves through os._exit once its output is
    flushed: in the interpreter's own teardown, gloo's threads can still release tensors that need
    the GIL, and the process then aborts (SIGABRT, "terminate called without an active exception",
    pytorch/pytorch#179291) after a run that finished and wrote everything; torchrun reports it as
    a failure. Every file a run writes is closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def cli():
    """The `minimind` command."""
    try:
        code = main()
    except BrokenPipeError:  # `minimind --help | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's own recipe for it
        code = 1
    exit_process(code)


if __name__ == "__main__":
    cli()
