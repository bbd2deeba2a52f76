"""The commands in README.md and docs/*.md, and those scripts/quickstart.sh and
scripts/gpu_check.sh run, parse with the current flags.

Every ```bash block, and every inline code span that runs python, is read as a shell would split
it (backslash continuations joined, comments dropped, `NAME="..."` assignments of the same file
expanded); each `python X.py ...` of the project's entry points and scripts (also after torchrun,
timeout, nohup or environment assignments) is parsed by that entry point's own parser, so a
renamed or removed flag, a value outside a flag's choices, or a variable the file never assigns
fails here instead of in a reader's terminal."""
import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess

import pytest

from modules import options
from scripts import bench, error_regions, make_dance_data, plot_report, run_experiments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
PARSERS = {
    "Trainer.py": options.trainer_parser,
    "Tester.py": options.tester_parser,
    "scripts/bench.py": bench.get_parser,
    "scripts/error_regions.py": error_regions.get_parser,
    "scripts/make_dance_data.py": make_dance_data.get_args_parser,
    "scripts/plot_report.py": plot_report.get_parser,
    "scripts/run_experiments.py": run_experiments.get_parser,
}
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(.*)$")
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")"}


def shell_lines(text):
    """(line, whole) for the logical lines of the ```bash blocks of a markdown text (continuations
    joined; whole=True), then for the inline code spans that run python (a span may wrap over
    lines; whole=False: a span may name a command without its required flags)."""
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            yield line, True
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        if re.match(r"\s*(?:\S+=\S+\s+)*python3? ", span):
            yield " ".join(span.split()), False


def commands(path):
    """(line, whole, (script, its arguments)) for each project command in the markdown file
    `path`. Optional flags written in brackets (`[--first_pose]`) are checked like the others."""
    variables = {}
    with open(os.path.join(ROOT, path)) as f:
        text = f.read()
    for line, whole in shell_lines(text):
        line = re.sub(r"\$\([^)]*\)", "X", line)  # command substitutions: some string
        line = re.sub(r"\[(--[^]]*)\]", r"\1", line)
        m = ASSIGNMENT.match(line.strip())
        if m and " python" not in line:
            variables[m.group(1)] = " ".join(shlex.split(m.group(2), comments=True))
            continue
        expanded = re.sub(r"\$\{?([A-Za-z_]\w*)\}?", lambda v: variables.get(v.group(1), v.group(0)), line)
        lexer = shlex.shlex(expanded, posix=True, punctuation_chars=True)
        lexer.commenters, lexer.whitespace_split = "#", True
        tokens, part = list(lexer), []
        for tok in tokens + [";"]:
            if tok not in SEPARATORS:
                part.append(tok)
                continue
            found = script_args(part)
            if found:
                yield line.strip(), whole, found
            part = []


def script_args(argv):
    """(script, its arguments) when argv runs one of the project's scripts, else None."""
    for i, tok in enumerate(argv):
        if tok in PARSERS:
            return tok, argv[i + 1:]
    return None


def all_commands():
    return [(path, line, script, args) for path in DOCS for line, _, (script, args) in commands(path)]


def test_the_docs_hold_commands_of_every_entry_point():
    scripts = {script for _, _, script, _ in all_commands()}
    assert {"Trainer.py", "Tester.py", "scripts/bench.py", "scripts/make_dance_data.py",
            "scripts/run_experiments.py", "scripts/plot_report.py"} <= scripts


def parse_failures(found):
    """The messages of the commands in `found` ((line, whole, (script, args)) each) that their
    entry point's parser rejects."""
    failures = []
    for line, whole, (script, args) in found:
        if script == "scripts/run_experiments.py" and "--" in args:  # flags after -- go to the Trainer
            cut = args.index("--")
            checks = [(script, args[:cut]), ("Trainer.py", args[cut + 1:])]
        else:
            checks = [(script, args)]
        for name, argv in checks:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    PARSERS[name]().parse_args(argv)
            except SystemExit as e:
                if not e.code:  # --help
                    continue
                message = err.getvalue().strip().splitlines()[-1]
                if whole or not re.search("required|expected one argument", message):
                    failures.append(f"{line}\n    {message}")
    return failures


@pytest.mark.parametrize("path", DOCS)
def test_documented_commands_parse(path):
    failures = parse_failures(commands(path))
    assert not failures, f"{path}: commands that no longer parse:\n" + "\n".join(failures)


# The shell scripts build their commands from arrays, defaults and loops, so bash itself expands
# them: each script runs in an empty folder with python, python3, timeout and source replaced by
# functions that record the arguments of every python command instead of running it.
STUBS = r'''
python() { [[ "${1:-}" == - || "${1:-}" == -c ]] && return 0; printf '%q ' "$@" >> "$CALLS"; echo >> "$CALLS"; }
python3() { python "$@"; }
timeout() { while [[ $# -gt 0 && "$1" != python* ]]; do shift; done; "$@"; }
source() { :; }
export -f python python3 timeout source
bash "$1"
'''
SHELL_SCRIPTS = {
    "scripts/quickstart.sh": {"scripts/make_dance_data.py", "Trainer.py", "Tester.py"},
    "scripts/gpu_check.sh": {"scripts/make_dance_data.py", "Trainer.py", "Tester.py",
                             "scripts/error_regions.py", "scripts/bench.py"},
}


def script_commands(script, folder):
    """(line, True, (script, its arguments)) for each project command the shell script runs."""
    os.makedirs(folder / "scripts")
    shutil.copy(os.path.join(ROOT, script), folder / "scripts")
    calls = folder / "calls"
    calls.touch()
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "DR", "LR", "TRAIN_S")}
    env["CALLS"] = str(calls)
    subprocess.run(["bash", "-c", STUBS, "stubs", str(folder / script)], cwd=folder, env=env,
                   capture_output=True, timeout=60, check=True)
    for line in calls.read_text().splitlines():
        found = script_args(shlex.split(line))
        if found:
            yield line.strip(), True, found


@pytest.mark.parametrize("script", sorted(SHELL_SCRIPTS))
def test_shell_script_commands_parse(script, tmp_path):
    found = list(script_commands(script, tmp_path))
    assert {name for _, _, (name, _) in found} == SHELL_SCRIPTS[script]
    failures = parse_failures(found)
    assert not failures, f"{script}: commands that no longer parse:\n" + "\n".join(failures)


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_help_names_no_default_of_none(script):
    """'--device ... (default: cuda when present) (default: None)': a default of None is the
    help's to explain, not the formatter's to print."""
    text = PARSERS[script]().format_help()
    assert "(default: None)" not in text
