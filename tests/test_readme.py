"""Every command README.md shows is run or checked here, so a renamed path, stage, option or param key breaks the
build rather than the reader.

How the README's fenced blocks are read:
- ```bash and ```sh: every line is a command (`\\` continues it, `#` starts a comment; `&&` and `;` join commands).
- ```console: a line starting with `$ ` is a command, the lines after it are its output.
- ```yaml: a params.yaml fragment rooted at a section: merged into params.yaml, it must load.
- ```text: no commands. The DAG diagram's `──<stage>──>` arrows name every stage of dvc.yaml, and only those.
- `path/to/...` is the reader's own path (a placeholder, checked by nothing).
- A block may opt out of being run with `<!-- not-run: the reason -->` on the line before it (it is still checked).

Commands quoted in the prose's inline code (`dvc add data/raw`, `transfer predict`) are commands too: they are
checked the same way, except that a command named without its required arguments passes.

Every command is checked statically: a `transfer`, `python -m stages.<stage>`, `torchrun` or `dvc` command line
parses with the real command's own parser (subcommand, options and arguments), a `make` target and the variables
given it are in the Makefile, a pip extra is in pyproject.toml, a `-S` key is a params key; every repository path
it names exists, or is produced by a dvc.yaml stage (outs, metrics, plots, the paths its commands name) or by
make and `transfer init` (PRODUCED). The prose is held to the same paths (inline code and links) and params
keys (inline code such as `finetune.unfreeze`).

The commands of RUN, cheap and safe, are also run in a scratch copy of the repository (its tracked files, a git
repository of their own), and the output the README shows after one must be in its real output: each shown
line's words in order within one real line, the shown lines in order (so columns and rows may be cut, but no
value may differ). In the full tier, every command of the blocks that needs no network, cluster or second machine
(NOT_IN_SCRATCH) runs, in order, after a `dvc repro` on generated images with a tiny backbone: `transfer predict`
on the models it wrote, `dvc exp run`, a commit of the run, a push to a DVC remote in a folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from pipeline.core.config import Params, load_params
from tests.conftest import REPO

README = REPO / "README.md"
PLACEHOLDER = "path/to/"
# Paths made by something other than a dvc.yaml stage: the environment (make), the user's images (`transfer
# init`, or `make run` writing the sample), DVC's plots page.
PRODUCED = {".venv": "make", "data/raw": "transfer init", "data/raw.dvc": "transfer init (dvc add)", "dvc_plots": ""}
# Commands run in the scratch copy: (leading words) of the ones that read the repository and change nothing
# tracked. Everything else is checked statically only.
RUN = [("transfer", "--help"), ("cat",), ("dvc", "dag"), ("dvc", "status")]
RUN += [("dvc", group, verb) for group in ("metrics", "params") for verb in ("show", "diff")]
RUN += [("dvc", "exp", "show"), ("dvc", "plots", "show")]


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    output: tuple[str, ...]  # the lines shown after it in a console block
    line: int  # in README.md
    runnable: bool  # False in a block marked not-run
    inline: bool = False  # in the prose: `transfer predict` names the command, its arguments may be left out

    def __str__(self) -> str:
        return " ".join(self.words)


@dataclass(frozen=True)
class Block:
    lang: str
    lines: tuple[str, ...]
    line: int
    not_run: bool


def blocks(text: str) -> list[Block]:
    found, lang, start, body, previous = [], None, 0, [], ""
    for number, line in enumerate(text.splitlines(), 1):
        if lang is None:
            if line.startswith("```"):
                lang, start, body = line[3:].strip(), number, []
                not_run = previous.strip().startswith("<!-- not-run:")
            elif line.strip():
                previous = line
        elif line.startswith("```"):
            found.append(Block(lang, tuple(body), start, not_run))
            lang, previous = None, ""
        else:
            body.append(line)
    assert lang is None, f"README.md:{start}: a fenced block is not closed"
    return found


def split_commands(line: str) -> list[list[str]]:
    """A shell line as its simple commands (comments dropped, split at && ; |)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&;|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", ";", "|", "||"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def commands(text: str) -> list[Command]:
    found = []
    for block in blocks(text):
        if block.lang in ("bash", "sh"):
            joined, first = "", None
            for number, line in enumerate(block.lines, block.line + 1):
                first = first or number
                joined += line[:-1] + " " if line.endswith("\\") else line
                if not line.endswith("\\"):
                    found += [Command(tuple(c), (), first, not block.not_run) for c in split_commands(joined)]
                    joined, first = "", None
        elif block.lang == "console":
            for number, line in enumerate(block.lines, block.line + 1):
                if line.startswith("$ "):
                    found += [Command(tuple(c), (), number, not block.not_run) for c in split_commands(line[2:])]
                elif found and found[-1].line >= block.line:
                    last = found.pop()
                    found.append(dataclasses.replace(last, output=(*last.output, line)))
    return found


def inline_commands(text: str) -> list[Command]:
    """Commands quoted in the prose (`transfer init path/to/photos`): checked; run only when in RUN."""
    found, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        fenced ^= line.startswith("```")
        for span in [] if fenced or line.startswith("```") else re.findall(r"`([^`\n]+)`", line):
            if span.split()[0] in INLINE_PROGRAMS:
                found += [Command(tuple(c), (), number, True, inline=True) for c in split_commands(span)]
    return found


INLINE_PROGRAMS = {"transfer", "dvc", "make", "torchrun", "pip", "ray"}
TEXT = README.read_text()
COMMANDS = commands(TEXT) + inline_commands(TEXT)


def to_run() -> list[Command]:
    """The commands of RUN, each once (where the README shows it twice, the one with its output)."""
    chosen: dict[tuple[str, ...], Command] = {}
    for command in COMMANDS:
        listed = command.runnable and any(command.words[: len(lead)] == lead for lead in RUN)
        if listed and (command.words not in chosen or command.output):
            chosen[command.words] = command
    return list(chosen.values())


# What the repository holds, and what its DAG writes.


@cache
def tracked() -> set[str]:
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    files = subprocess.run(listing, cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    return {f for f in files if f and (REPO / f).exists()}  # a file deleted in the working tree is gone


@cache
def stage_paths() -> tuple[set[str], set[str]]:
    """(stage names as dvc.yaml writes them, every path a stage writes or its command names)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        every = list(repo.index.stages)  # dvc.yaml's stages, and data/raw.dvc's (an output, no command)
        paths = {str(out.def_path) for stage in every for out in stage.outs}
        stages = [stage for stage in every if stage.cmd]
        for stage in stages:
            paths |= {w for w in stage.cmd.split() if "/" in w and not w.startswith("-")}
    return {stage.addressing.split("@")[0] for stage in stages}, paths


def known_paths() -> set[str]:
    paths = tracked() | stage_paths()[1] | set(PRODUCED)
    return paths | {str(parent) for p in paths for parent in Path(p).parents if str(parent) != "."}


def top_level() -> set[str]:
    return {p.split("/")[0] for p in tracked()} | {p.split("/")[0] for p in PRODUCED} | {"data", ".cache"}


def as_repo_path(token: str) -> str | None:
    """The repository path a word names, or None for a word that names none (an option, a URL, a model name)."""
    token = token.strip("'\"`.,:;()").removeprefix("./")
    if "=" in token:
        token = token.split("=", 1)[1]
    if not token or "://" in token or token.startswith("-") or " " in token:
        return None
    if "/" in token:
        return token.rstrip("/") if token.split("/")[0] in top_level() else None
    return token if token in top_level() and "." in token or token == "Makefile" else None


def path_problem(path: str) -> str | None:
    if PLACEHOLDER in path:
        return None
    pattern = re.sub(r"<[^>]+>|\.\.\.", "*", path)
    known = known_paths()
    if fnmatch.filter(known, pattern):
        return None
    # Inside a folder a stage writes (data/export/<model>.onnx) or one made elsewhere (data/raw/<class>/...), unless
    # the repository holds that folder's files (reports/models/): then it is one of them.
    folders = {p for p in stage_paths()[1] | set(PRODUCED) if not Path(p).suffix}
    folders = {f for f in folders if not any(t.startswith(f + "/") for t in tracked())}
    if any(pattern.startswith(folder + "/") for folder in folders):
        return None
    return f"{path} is neither in the repository nor written by a dvc.yaml stage"


def params_key_problem(key: str) -> str | None:
    """None when `key` (dotted, `<label>` for a name of the user's) is a key params.yaml accepts."""
    tp: typing.Any = Params
    for part in key.split("."):
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next(a for a in typing.get_args(tp) if a is not type(None))
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return f"params key {key}: no '{part}' here (valid: {', '.join(hints)})"
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]  # a label of the user's, a head's name, an argument of the estimator
        else:
            return f"params key {key}: '{part}' is below a value"
    return None


# Static checks, by program.


def click_problem(group: click.Command, words: list[str], name: str, whole: bool = True) -> str | None:
    """Parse words as the click command would (subcommands, options, arguments), without running it; not whole:
    the words name a command and some of its options, its required arguments may be missing."""
    command, args, parent = group, list(words), None
    try:
        while isinstance(command, click.Group):
            # Up to the first word that is not an option: the group's own options (--help), then the subcommand.
            at = next((i for i, word in enumerate(args) if not word.startswith("-")), len(args))
            context = command.make_context(name, args[:at], parent=parent, resilient_parsing=True)
            if at == len(args):
                return None
            sub = command.get_command(context, args[at])
            if sub is None:
                return f"{name} has no subcommand {args[at]} (it has {', '.join(command.list_commands(context))})"
            command, name, parent, args = sub, args[at], context, args[at + 1 :]
        command.make_context(name, args, parent=parent, resilient_parsing=not whole)
    except click.exceptions.Exit:  # --help
        return None
    except click.ClickException as err:
        return f"{name}: {err.format_message()}"
    return None


def transfer_problem(command: Command) -> str | None:
    from pipeline.cli import main

    words = command.words
    problem = click_problem(main, list(words[1:]), "transfer", not command.inline)
    if problem is None and len(words) > 1 and not words[1].startswith("-"):
        # The subcommand's own --help lists every option the README gives it.
        result = CliRunner().invoke(main, [words[1], "--help"])
        missing = [w for w in words if w.startswith("--") and w.split("=")[0] not in result.output]
        if result.exit_code or missing:
            return f"transfer {words[1]} --help: exit {result.exit_code}, options missing: {missing}"
    return problem


def stage_module_problem(module: str, args: list[str]) -> str | None:
    import importlib

    if not module.startswith("stages.") or not (REPO / "stages" / f"{module.split('.')[1]}.py").is_file():
        return f"no stage module {module}"
    return click_problem(importlib.import_module(module).main, args, module)


def dvc_problem(command: Command) -> str | None:
    from dvc.cli import DvcParserError
    from dvc.cli.parser import get_main_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            get_main_parser().parse_args(command.words[1:])
    except (SystemExit, DvcParserError):
        return f"dvc does not parse it: {stderr.getvalue().strip().splitlines()[-1:]}"
    for flag, value in zip(command.words, command.words[1:], strict=False):
        if flag in ("-S", "--set-param"):
            key = value.split("=", 1)[0].split(":")[-1]
            if problem := params_key_problem(key):
                return problem
    return None


def make_problem(command: Command) -> str | None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w.-]+)\s*:(?!=)", makefile, re.M))
    for word in command.words[1:]:
        if "=" in word:
            variable = word.split("=", 1)[0]
            if f"$({variable})" not in makefile and f"${{{variable}}}" not in makefile:
                return f"make: the Makefile does not use the variable {variable}"
        elif word not in targets:
            return f"make: no target {word} (targets: {', '.join(sorted(targets))})"
    return None


def torchrun_problem(command: Command) -> str | None:
    from torch.distributed.run import get_args_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args = get_args_parser().parse_args(command.words[1:])
    except SystemExit:
        return f"torchrun does not parse it: {stderr.getvalue().strip()}"
    if not args.module:
        return "torchrun: the README runs stages as modules (-m stages.<stage>)"
    return stage_module_problem(args.training_script, args.training_script_args)


def pip_problem(command: Command) -> str | None:
    pyproject = (REPO / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = re.findall(r"^([\w-]+) = ", section, re.M)
    for word in command.words[2:]:
        match = re.fullmatch(r"\.\[([\w,]+)\]", word)
        if match and not set(match[1].split(",")) <= set(extras):
            return f"pip: pyproject.toml has no extra {match[1]} (it has {', '.join(extras)})"
        if word.startswith(("transfer-pipeline", "transfer_pipeline")):
            return "pip: transfer-pipeline is not published; install the checkout (pip install -e .)"
    return None


def python_problem(command: Command) -> str | None:
    words = command.words
    if words[1] == "-m":
        return stage_module_problem(words[2], list(words[3:]))
    return None if (REPO / words[1]).is_file() else f"python: no script {words[1]}"


def ray_problem(command: Command) -> str | None:
    scripts = pytest.importorskip("ray.scripts.scripts", reason="Ray is in the dev extra")
    return click_problem(scripts.cli, list(command.words[1:]), "ray", not command.inline)


CHECKERS = {
    "ray": ray_problem,
    "transfer": transfer_problem,
    "dvc": dvc_problem,
    "make": make_problem,
    "torchrun": torchrun_problem,
    "pip": pip_problem,
    "python": python_problem,
    "git": lambda c: None if c.words[1] in ("add", "commit", "checkout") else f"git {c.words[1]}: not expected",
    "source": lambda c: None,
    "export": lambda c: None if all(re.fullmatch(r"[A-Z_]+=\S+", w) for w in c.words[1:]) else "export VAR=value",
    "cat": lambda c: None,
}


def command_problems(command: Command) -> list[str]:
    checker = CHECKERS.get(command.words[0])
    if checker is None:
        return [f"no check for the program {command.words[0]}: add one to CHECKERS"]
    problems = [checker(command)]
    problems += [path_problem(p) for w in command.words[1:] if (p := as_repo_path(w))]
    return [p for p in problems if p]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_each_command_parses_and_names_real_paths(command: Command):
    assert not command_problems(command), f"README.md:{command.line}: {command}: {command_problems(command)}"


def test_the_readme_shows_the_commands_a_newcomer_needs():
    shown = {tuple(c.words[:2]) for c in COMMANDS}
    assert {("make", "run"), ("make", "test"), ("dvc", "repro"), ("dvc", "metrics"), ("transfer", "predict")} <= shown
    assert any(c.words[:2] == ("make", "run") and any(w.startswith("DATA=") for w in c.words) for c in COMMANDS)
    assert len(TEXT.splitlines()) < 400


def prose() -> str:
    """The README without its fenced blocks."""
    return re.sub(r"^```.*?^```", "", TEXT, flags=re.M | re.S)


def test_paths_named_in_the_prose_exist_or_are_written_by_a_stage():
    spans = re.findall(r"`([^`\n]+)`", prose()) + re.findall(r"\]\(([^)\s]+)\)", prose())
    words = [w for span in spans if "://" not in span for w in span.split()]
    problems = {path_problem(p) for w in words if (p := as_repo_path(w))} - {None}
    assert not problems


def test_params_keys_named_in_the_prose_exist():
    sections = "|".join(f.name for f in dataclasses.fields(Params))
    keys = re.findall(rf"`((?:{sections})(?:\.[\w<>]+)+)(?:[:=][^`]*)?`", prose())
    assert keys, "the README names no params key: is the pattern right?"
    problems = {params_key_problem(k) for k in keys} - {None}
    assert not problems


def deep_merge(base: dict, fragment: dict) -> dict:
    merged = dict(base)
    for key, value in fragment.items():
        merged[key] = (
            deep_merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
        )
    return merged


@pytest.mark.parametrize("block", [b for b in blocks(TEXT) if b.lang == "yaml"], ids=lambda b: f"line {b.line}")
def test_each_params_fragment_loads_when_merged_into_params_yaml(block: Block, tmp_path: Path):
    fragment = yaml.safe_load("\n".join(block.lines))
    params = deep_merge(yaml.safe_load((REPO / "params.yaml").read_text()), fragment)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    load_params(tmp_path / "params.yaml")  # raises ConfigError naming a key it does not know


def test_the_dag_diagram_names_every_stage_of_dvc_yaml():
    diagrams = [b for b in blocks(TEXT) if b.lang == "text" and any("──>" in line for line in b.lines)]
    assert len(diagrams) == 1
    drawn = set(re.findall(r"──(\w+)(?:@[^─\s]*)?──>", "\n".join(diagrams[0].lines)))
    assert drawn == stage_paths()[0]
    table = set(re.findall(r"^\| `(\w+)(?:@[^`]*)?`(?:, `(\w+)`)?", TEXT, re.M))
    assert {name for row in table for name in row if name} == stage_paths()[0]


# Running the cheap ones.


def _scratch_copy(where: Path) -> tuple[Path, dict]:
    """The repository's files (tracked, or new and not ignored), as a git repository of their own, one commit."""
    root = where / "repo"
    for name in tracked():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, root / name)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "PYTHONPATH": str(root),
        "HOME": str(where),
        "GIT_AUTHOR_NAME": "ci",
        "GIT_AUTHOR_EMAIL": "ci@example.com",
        "GIT_COMMITTER_NAME": "ci",
        "GIT_COMMITTER_EMAIL": "ci@example.com",
    }
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "the README's repository"]):
        subprocess.run(["git", *args], cwd=root, env=env, check=True, capture_output=True)
    return root, env


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return _scratch_copy(tmp_path_factory.mktemp("readme"))


def run_in(scratch: tuple[Path, dict], words: tuple[str, ...]) -> str:
    root, env = scratch
    program = {"transfer": [sys.executable, "-c", "from pipeline.cli import main; main()"], "dvc": ["dvc"]}
    argv = [*program.get(words[0], [words[0]]), *words[1:]]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(words)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def shown_output_problem(shown: tuple[str, ...], real: str) -> str | None:
    """None when each shown line's words appear, in order, in a real line, the lines in order."""
    lines = iter(real.splitlines())
    for line in shown:
        words = line.split()
        if not words or line.strip() == "...":
            continue
        for candidate in lines:
            it = iter(candidate.split())
            if all(word in it for word in words):
                break
        else:
            return f"shown line not in the real output (in order): {line!r}\nreal output:\n{real}"
    return None


@pytest.mark.parametrize("command", to_run(), ids=str)
def test_the_cheap_commands_run_and_show_their_real_output(command: Command, scratch):
    real = run_in(scratch, command.words)
    assert not shown_output_problem(command.output, real), f"README.md:{command.line}: {command}"


def test_the_checks_catch_what_they_are_for():
    """Each check refuses the kind of mistake the issue found in the README."""

    def problems(line: str) -> list[str]:
        return command_problems(Command(tuple(split_commands(line)[0]), (), 0, True))

    assert problems("transfer predict --head data/heads/logreg.h5 --features data/features/x.h5 new/")  # moved
    assert problems("transfer predict --head-file x.h5 new/") and problems("transfer evaluate")
    assert problems("dvc exp run -S heads.logreg.C=[0.1]")  # the grid is heads.logreg.grid.C
    assert not problems("dvc exp run -S heads.logreg.grid.C=[0.1]") and problems("dvc metrics diffs")
    assert path_problem("reports/models/logreg_reliability.png")  # the report's folder is committed: its files
    assert not path_problem("data/heads/<b>/<head>.h5") and not path_problem("data/export/finetune.onnx")
    assert problems("pip install 'transfer-pipeline[ray]'") and problems("pip install -e '.[gpu]'")
    assert problems("make no-such-target") and problems("python -m stages.evaluate")
    assert problems("torchrun --nproc_per_node 2 -m stages.finetune --data data/raw --epochs 3")
    assert params_key_problem("finetune.unfreezes") and not params_key_problem("extract.backbones.<label>.weights")
    assert shown_output_problem(("a 0.97",), "a 0.96\n") and not shown_output_problem(("a 0.97",), "a b 0.97 c\n")


# The rest, on a pipeline run: every command of the README's blocks, in order, in a scratch copy whose default
# backbone entry is a tiny random network (so that the paths are the README's), on generated images.

NOT_IN_SCRATCH = {
    "make": "installs and runs the whole pipeline on the real backbone (the e2e tests run dvc repro)",
    "pip": "needs the network",
    "source": "the environment is this test's",
    "export": "names a Ray cluster",
    "torchrun": "needs a second machine",
    "ray": "starts a cluster",
}


@pytest.mark.integration
def test_the_readme_commands_run_on_a_pipeline_run(tmp_path: Path):
    from tests.conftest import write_image_folder

    root, env = _scratch_copy(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["extract"].update(backbones={"efficientnet_lite0": {"backbone": "test_resnet", "image_size": 32}})
    params["extract"].update(num_workers=0, batch_size=16)
    params["finetune"].update(epochs=1, num_workers=0, batch_size=8)
    params["heads"] = {"logreg": params["heads"]["logreg"]}  # the chosen head: data/export/<backbone>-logreg.onnx
    params["learning_curve"].update(shots=[1, 2], seeds=1)
    params["audit"].update(folds=2)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    write_image_folder(root / "data" / "raw", {"ants": 10, "bees": 10, "wasps": 10})
    new = write_image_folder(tmp_path / "new_photos", {"x": 2}, size=40, seed=1)
    placeholders = {
        "path/to/new_photos": str(new[0].parent),
        "path/to/photo.jpg": str(new[0]),
        "/path/to/dvc-store": str(tmp_path / "dvc-store"),
    }
    run_in((root, env), ("dvc", "add", "data/raw"))  # what `transfer init` does after copying the images
    run_in((root, env), ("git", "add", "-A"))
    run_in((root, env), ("git", "commit", "-qm", "a tiny backbone"))
    run_in((root, env), ("dvc", "repro"))
    for command in COMMANDS:
        if command.words[0] in NOT_IN_SCRATCH or not command.runnable or command.inline:
            continue
        words = []
        for word in command.words:
            assert PLACEHOLDER not in word or word in placeholders, f"README.md:{command.line}: map {word} here"
            words.append(placeholders.get(word, word))
        run_in((root, env), tuple(words))
    assert "efficientnet_lite0" in run_in((root, env), ("transfer", "inspect", "data/features/efficientnet_lite0.h5"))
