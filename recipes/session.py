"""The whole path in one command: pretraining, SFT, evaluation, DPO, GRPO and export, then report.md.

    recipes/cpu_session.sh [DATA_DIR] [RUN_DIR]     # this machine's settings, recipes/cpu/*.yaml
    recipes/gpu_session.sh [DATA_DIR] [RUN_DIR]     # larger settings for a GPU, recipes/gpu/*.yaml
    python recipes/session.py --settings recipes/cpu --data_dir data --run_dir output/session

Each step is one of the commands the README and the guides show (python train.py ..., minimind eval
..., minimind export ...), run as a child process with its output shown and kept in
RUN_DIR/logs/STEP.log. The training settings of each stage (shape, epochs, learning rate ...) are
the YAML files in the settings folder, passed with --config, so a step can be rerun by hand with
the command the report shows. The data folder needs the files data/make_demo_data.py writes, so a
world of another seed runs the same way.

Resumable: a step that finished leaves RUN_DIR/steps/STEP.json (its command, wall time, peak
memory) and is skipped when the session runs again; training steps always pass --resume, so one
that was interrupted continues from its last checkpoint (a first start with --resume starts afresh).

report.md in RUN_DIR (rewritten after every step): each step's command, wall time and peak memory,
the loss curves, held-out exact match by skill after each stage, DPO's preference measures, and
three sample answers per stage.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "sft", "dpo", "grpo"]          # each reads its settings from SETTINGS/STAGE.yaml
HELD_OUT = "sft_eval.jsonl"                          # held-out questions, as conversations with a "skill"
HELD_OUT_SYSTEM = "grpo_eval_system.jsonl"          # the same questions with a system prompt
SAMPLE_SKILLS = 3                                     # sample answers per stage: one for each of the first skills


def train_command(settings, stage, data, output_dir, extra=()):
    return ["python", "train.py", "--config", str(settings / f"{stage}.yaml"),
            "--data", *data, "--output_dir", str(output_dir), "--resume", *extra]


def eval_command(model, data, report, eval_flags):
    return ["minimind", "eval", "--model", str(model), "--data", str(data), "--report", str(report), *eval_flags]


def plan(settings, data_dir, run_dir, eval_flags):
    """The session's steps in order: (name, command, what it reads that must exist)."""
    d, r = Path(data_dir), Path(run_dir)
    held_out = d / HELD_OUT

    def evals(model, name, *files):
        return [(f"eval_{name}_{Path(f).stem}", eval_command(r / model / "final", f, r / "eval" / f"{name}.{Path(f).stem}.json",
                                                              eval_flags)) for f in files]
    steps = [("pretrain", train_command(settings, "pretrain", [str(d / "pretrain.jsonl")], r / "pretrain"))]
    steps += evals("pretrain", "pretrain", held_out)
    steps.append(("sft", train_command(settings, "sft", [str(d / "sft_train.jsonl")], r / "sft",
                                       ["--eval_data", str(held_out), "--replay_data", str(d / "pretrain.jsonl"),
                                        "--pretrained_path", str(r / "pretrain" / "final")])))
    steps += evals("sft", "sft", held_out, d / HELD_OUT_SYSTEM, d / "dpo_eval.jsonl")
    steps.append(("dpo", train_command(settings, "dpo", [str(d / "dpo_train.jsonl")], r / "dpo",
                                       ["--eval_data", str(d / "dpo_eval.jsonl"), "--pretrained_path", str(r / "sft" / "final")])))
    steps += evals("dpo", "dpo", held_out, d / "dpo_eval.jsonl")
    steps.append(("grpo", train_command(settings, "grpo", [str(d / "grpo_train.jsonl")], r / "grpo",
                                        ["--eval_data", str(d / "grpo_eval.jsonl"), "--pretrained_path", str(r / "sft" / "final")])))
    steps += evals("grpo", "grpo", held_out, d / HELD_OUT_SYSTEM)
    steps.append(("export", ["minimind", "export", "--model", str(r / "grpo" / "final"), "--to", "gguf",
                             "--output_dir", str(r / "export")]))
    return steps


# ---------------------------------------------------------------- running a step

def executable(command):
    """The command as this Python runs it: `python` is this interpreter, `minimind` the script beside it
    (so that a session started as venv/bin/python recipes/session.py uses that venv throughout)."""
    program = {"python": sys.executable, "train.py": str(ROOT / "train.py"),
               "minimind": str(Path(sys.executable).with_name("minimind"))}
    head = [program.get(part, part) for part in command[:2]]
    if head[0].endswith("minimind") and not Path(head[0]).exists():
        head = [sys.executable, "-m", "minimind.cli"] + head[1:]
    return head + command[2:]


def run_step(name, command, run_dir):
    """Run one command, its output shown and logged; returns (exit code, wall seconds, peak resident MiB)."""
    log_path = Path(run_dir) / "logs" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    start = time.monotonic()
    with open(log_path, "w") as log:
        process = subprocess.Popen(executable(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1)
        for line in process.stdout:
            sys.stdout.write(line)
            log.write(line)
        process.stdout.close()
        # wait4 gives this child's own resource usage: ru_maxrss is its peak resident memory in KiB
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, time.monotonic() - start, usage.ru_maxrss / 1024


def gpu_peak(run_dir, name):
    """The GPU memory a training step reports on its "Peak memory:" line, if it ran on one."""
    log = Path(run_dir) / "logs" / f"{name}.log"
    for line in reversed(log.read_text().splitlines() if log.exists() else []):
        if line.startswith("Peak memory:") and "GPU" in line:
            return line.split(",")[-1].strip()
    return ""


DATA_FILES = ["pretrain.jsonl", "sft_train.jsonl", HELD_OUT, HELD_OUT_SYSTEM, "dpo_train.jsonl", "dpo_eval.jsonl",
              "grpo_train.jsonl", "grpo_eval.jsonl"]


def missing_inputs(settings, data_dir):
    """What the session needs and does not find, checked before the first step starts."""
    missing = [str(Path(data_dir) / name) for name in DATA_FILES if not (Path(data_dir) / name).is_file()]
    return missing + [str(Path(settings) / f"{stage}.yaml") for stage in STAGES
                      if not (Path(settings) / f"{stage}.yaml").is_file()]


def run_session(settings, data_dir, run_dir, eval_flags):
    missing = missing_inputs(settings, data_dir)
    if missing:
        print(f"error: not found: {', '.join(missing)}. The data folder needs the files that "
              f"data/make_demo_data.py writes (python data/make_demo_data.py --seed N --output_dir DIR), the "
              f"settings folder one YAML file per stage (recipes/cpu/).", file=sys.stderr)
        return 2
    run_dir = Path(run_dir)
    done_dir = run_dir / "steps"
    done_dir.mkdir(parents=True, exist_ok=True)
    started = {"load": os.getloadavg(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    for name, command in plan(settings, data_dir, run_dir, eval_flags):
        done = done_dir / f"{name}.json"
        if done.exists():
            print(f"=== {name}: done in an earlier run, skipped ({done})")
            continue
        code, seconds, peak_mib = run_step(name, command, run_dir)
        if code != 0:
            print(f"\nerror: step {name} failed with exit code {code}; its log is {run_dir / 'logs' / (name + '.log')}. "
                  f"Fix the cause and run the same command again: finished steps are skipped.", file=sys.stderr)
            write_report(settings, data_dir, run_dir, started)
            return code
        done.write_text(json.dumps({"command": shlex.join(command), "wall_s": seconds, "peak_rss_mib": peak_mib,
                                    "gpu_peak": gpu_peak(run_dir, name), "load_after": os.getloadavg()}) + "\n")
        write_report(settings, data_dir, run_dir, started)
    print(f"\nreport: {run_dir / 'report.md'}")
    return 0


# ---------------------------------------------------------------- report.md

def minutes(seconds):
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s" if seconds >= 60 else f"{seconds:.0f} s"


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def relative(path, run_dir):
    try:
        return str(Path(path).resolve().relative_to(Path(run_dir).resolve()))
    except ValueError:
        return str(path)


def known_from(data_dir):
    """Each held-out question's "known_from" label (pretraining: a fact only the pretraining prose
    states; sft: an SFT item asked in a new wording), in the file's order, which is the reports'."""
    path = Path(data_dir) / HELD_OUT
    return [json.loads(line).get("known_from") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def skill_table(run_dir, data_dir):
    """Held-out exact match by skill after each stage (the eval reports' by_skill), then by where the
    fact is known from, as markdown rows."""
    columns = [("after pretraining", "pretrain.sft_eval"), ("after SFT", "sft.sft_eval"),
               ("SFT, with a system prompt", "sft.grpo_eval_system"), ("after DPO", "dpo.sft_eval"),
               ("after GRPO", "grpo.sft_eval"), ("GRPO, with a system prompt", "grpo.grpo_eval_system")]
    reports = [(title, read_json(Path(run_dir) / "eval" / f"{stem}.json")) for title, stem in columns]
    reports = [(title, report) for title, report in reports if report]
    if not reports:
        return []
    skills = list(dict.fromkeys(skill for _, report in reports for skill in report.get("by_skill", {})))

    def cell(report, skill=None):
        part = report["by_skill"].get(skill) if skill else {"correct": sum(d["match"] for d in report["details"]),
                                                             "total": len(report["details"])}
        return f"{part['correct'] / part['total']:.1%} ({part['correct']}/{part['total']})" if part else "–"
    lines = ["| skill | " + " | ".join(title for title, _ in reports) + " |",
             "| --- |" + " ---: |" * len(reports)]
    for skill in skills:
        lines.append(f"| {skill} | " + " | ".join(cell(report, skill) for _, report in reports) + " |")
    lines.append("| **all** | " + " | ".join(f"**{cell(report)}**" for _, report in reports) + " |")
    labels = known_from(data_dir)
    for label, title in (("pretraining", "facts only the pretraining prose states"), ("sft", "SFT items, new wording")):
        def part(report):
            matches = [d["match"] for d, known in zip(report["details"], labels) if known == label]
            return f"{sum(matches) / len(matches):.1%} ({sum(matches)}/{len(matches)})" if matches else "–"
        if label in labels:
            lines.append(f"| {title} | " + " | ".join(part(report) for _, report in reports) + " |")
    return lines


def sample_answers(report, count=SAMPLE_SKILLS):
    """The first held-out question of each of the first `count` skills, with the model's answer."""
    if not report:
        return []
    chosen, seen = [], set()
    for detail in report["details"]:
        skill = detail.get("skill")
        if skill not in seen and len(chosen) < count:
            seen.add(skill)
            chosen.append(detail)
    return [f"- {shown(d['question'])} → {shown(d['answer'])} ({'right' if d['match'] else 'wrong; reference: ' + shown(d['reference'])})"
            for d in chosen]


def shown(text, limit=80):
    """Text as one line of inline code: line breaks shown as ⏎, long text cut."""
    text = text.replace("\n", "⏎").replace("`", "'")
    return f"`{text[:limit]}{'…' if len(text) > limit else ''}`"


def preference_rows(run_dir):
    rows = []
    for title, stem in (("SFT", "sft.dpo_eval"), ("DPO", "dpo.dpo_eval")):
        report = read_json(Path(run_dir) / "eval" / f"{stem}.json")
        if report:
            filler = sum(d["answer"].startswith(("Let me think.", "让我想想。")) for d in report["details"]) / report["pairs"]
            rows.append(f"| {title} | {report['preference_accuracy']:.0%} | {report['greedy_equals_chosen']:.0%} | "
                        f"{report['greedy_equals_rejected']:.0%} | {filler:.0%} |")
    if not rows:
        return []
    return ["| model | log-prob prefers chosen | greedy = chosen | greedy = rejected | greedy opens with the filler |",
            "| --- | ---: | ---: | ---: | ---: |", *rows]


def write_report(settings, data_dir, run_dir, started):
    run_dir = Path(run_dir)
    steps = [(name, read_json(run_dir / "steps" / f"{name}.json")) for name, _ in plan(settings, data_dir, run_dir, [])]
    finished = [(name, step) for name, step in steps if step]
    total = sum(step["wall_s"] for _, step in finished)
    lines = [f"# Session report: {run_dir}", "",
             f"Data: `{data_dir}`; settings: `{relative(settings, ROOT)}`; started {started['time']} "
             f"(load average {started['load'][0]:.2f}); {os.cpu_count()} CPUs. "
             f"{len(finished)} of {len(steps)} steps done, {minutes(total)} of wall time in all.", "",
             "## Steps", "", "| step | wall time | peak memory | load after | command |", "| --- | ---: | ---: | ---: | --- |"]
    for name, step in finished:
        memory = f"{step['peak_rss_mib']:.0f} MiB" + (f", {step['gpu_peak']}" if step["gpu_peak"] else "")
        lines.append(f"| {name} | {minutes(step['wall_s'])} | {memory} | {step['load_after'][0]:.2f} | `{step['command']}` |")
    training = [name for name in STAGES if (run_dir / name / "final").exists()]
    if training:
        lines += ["", "Pretraining and SFT together: " + minutes(sum(step["wall_s"] for name, step in finished
                                                                      if name in ("pretrain", "sft"))) + "."]
    table = skill_table(run_dir, data_dir)
    if table:
        lines += ["", "## Held-out exact match by skill", "",
                  f"`{HELD_OUT}`: questions that neither SFT nor pretraining's question-answer text asks; "
                  "half about facts only the pretraining prose states. The system-prompt columns ask the same "
                  f"questions with a system prompt (`{HELD_OUT_SYSTEM}`).", "", *table]
    preferences = preference_rows(run_dir)
    if preferences:
        lines += ["", "## DPO, on the held-out pairs (`dpo_eval.jsonl`)", "", *preferences]
    curves = [name for name in STAGES if (run_dir / name / "loss.png").exists()]
    if curves:
        lines += ["", "## Loss curves", ""] + [f"![{name}]({name}/loss.png)" for name in curves]
    samples = []
    for name in STAGES:
        answers = sample_answers(read_json(run_dir / "eval" / f"{name}.sft_eval.json"))
        if answers:
            samples += ["", f"After {name}:", *answers]
    if samples:
        lines += ["", "## Sample answers (held-out questions)", *samples]
    (run_dir / "report.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=str(ROOT / "recipes" / "cpu"),
                        help="folder with pretrain.yaml, sft.yaml, dpo.yaml, grpo.yaml [recipes/cpu]")
    parser.add_argument("--data_dir", default=str(ROOT / "data"), help="the world's data files [data/]")
    parser.add_argument("--run_dir", default=str(ROOT / "output" / "session"), help="where everything is written")
    parser.add_argument("--eval_batch_size", type=int, default=32, help="minimind eval --batch_size")
    parser.add_argument("--eval_max_samples", type=int, default=None, help="minimind eval --max_samples [all]")
    args = parser.parse_args(argv)
    eval_flags = ["--batch_size", str(args.eval_batch_size)]
    if args.eval_max_samples:
        eval_flags += ["--max_samples", str(args.eval_max_samples)]
    return run_session(Path(args.settings), args.data_dir, args.run_dir, eval_flags)


if __name__ == "__main__":
    sys.exit(main())
