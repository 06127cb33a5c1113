"""The Colab notebook (scripts/colab_seed_msa.ipynb): valid nbformat v4, and every engine command it
runs exists with the arguments it passes.

How a command is checked, the way Colab would run it:
  1. a code cell's `!` line, joined with its `\\` continuation lines (IPython does the same);
  2. `{NAME}` / `$NAME` replaced by the value NAME gets in the notebook's Settings cell (IPython's
     variable expansion; every variable a command uses must be set there, so rerunning that one
     cell after a runtime restart is enough);
  3. split like a shell (shlex), cut at `&&`, `|`, `;`; each `-m engine.X ...` segment is one command;
  4. argparse CLIs (engine.data, .evaluate, .generate, .merge, .plot): the argument list is parsed
     by the module's own parser, captured from its `main`, with prefix matching off (argparse
     would otherwise accept `--max-new` for `--max-new-tokens`, and a misspelling could hide);
     Hydra CLIs (engine.train, .plan): the overrides are composed with the repository's `conf/`
     exactly as `hydra.main` does, path values swapped for real temporary files so that
     `RunConfig.validate()` runs whole.
Each failure path of the checker has a test of its own below: a checker that cannot fail checks nothing.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import re
import shlex
from pathlib import Path
from unittest import mock

import nbformat  # the dev extra installs it
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "scripts" / "colab_seed_msa.ipynb"
SETTINGS_CELL_ID = "settings"

ARGPARSE_CLIS = {  # module run by `python -m` -> module whose main() builds and parses the arguments
    "engine.data": "engine.data.__main__",
    "engine.evaluate": "engine.evaluate",
    "engine.generate": "engine.generate",
    "engine.export.merge": "engine.export.merge",
    "engine.plot": "engine.plot",
}
HYDRA_CLIS = ("engine.train", "engine.plan")
# Hydra keys that hold paths: the notebook's Colab paths do not exist here, so these are swapped for
# temporary files ("file") or directories ("dir") before RunConfig.validate() checks they exist.
PATH_KEYS = {"model.path": "dir", "data.train_path": "file", "data.eval_path": "file",
             "output_dir": "dir", "data.cache_dir": "dir"}
SHELL_OPERATORS = {"&&", "||", "|", ";", "&"}
REDIRECTS = {">", ">>", "<", "&>"}


class NotebookCheckError(AssertionError):
    """A notebook command that would fail on Colab; the message names the command and why."""


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        self.namespace = namespace


# ----------------------------------------------------------------------------- reading the notebook

def load_notebook(path: Path = NOTEBOOK):
    return nbformat.read(str(path), as_version=nbformat.NO_CONVERT)


def shell_lines(source: str) -> list[str]:
    """The `!` lines of a code cell's source, each joined with its backslash continuation lines."""
    lines, out, i = source.split("\n"), [], 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("!"):
            parts = [line[1:]]
            while parts[-1].endswith("\\") and i + 1 < len(lines):
                parts[-1] = parts[-1][:-1]
                i += 1
                parts.append(lines[i].strip())
            out.append(" ".join(p.strip() for p in parts).strip())
        i += 1
    return out


def settings_namespace(nb) -> dict:
    """Values of the Settings cell's `NAME = ...` assignments (literals, f-strings of earlier
    names and + of them: nothing else is evaluated)."""
    cells = [c for c in nb.cells if c.get("id") == SETTINGS_CELL_ID]
    if len(cells) != 1 or cells[0].cell_type != "code":
        raise NotebookCheckError(f"the notebook needs exactly one code cell with id {SETTINGS_CELL_ID!r}")
    allowed = (ast.Constant, ast.JoinedStr, ast.FormattedValue, ast.Name, ast.Load, ast.BinOp, ast.Add)
    ns: dict = {}
    for node in ast.parse(cells[0].source).body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise NotebookCheckError(f"Settings cell line {node.lineno}: only `NAME = value` assignments belong there")
        bad = [type(n).__name__ for n in ast.walk(node.value) if not isinstance(n, allowed)]
        if bad:
            raise NotebookCheckError(f"Settings cell line {node.lineno}: {bad[0]} is not a plain value")
        ns[node.targets[0].id] = eval(compile(ast.Expression(node.value), "settings", "eval"),  # noqa: S307
                                      {"__builtins__": {}}, dict(ns))
    return ns


def expand(line: str, ns: dict) -> str:
    """IPython's expansion of `{NAME}` and `$NAME` in a shell line (`$(...)` is left to the shell)."""
    def value(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in ns:
            raise NotebookCheckError(f"`{m.group(0)}` in `!{line}`: {name} is not set in the Settings cell")
        return str(ns[name])

    out = re.sub(r"\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", value, line)
    leftover = re.search(r"\{[^{}]*\}", out)
    if leftover:
        raise NotebookCheckError(f"`{leftover.group(0)}` in `!{line}`: only {{NAME}} expansions are checked")
    return out


def engine_commands(line: str) -> list[tuple[str, list[str]]]:
    """(module, argv) for every `-m engine.X ...` segment of an expanded shell line."""
    # fd duplications (2>&1) go; "2> file" becomes "> file": then every redirection is one token
    line = re.sub(r"(?<!\S)\d?>&\d", " ", line)
    line = re.sub(r"(?<!\S)\d(>>?)", r"\1", line)
    lexer = shlex.shlex(line, posix=True, punctuation_chars="&|;<>")
    lexer.whitespace_split = True
    segments, current, skip = [], [], False
    for token in lexer:
        if skip:  # the target of a redirection is not an argument
            skip = False
        elif token in SHELL_OPERATORS:
            segments.append(current)
            current = []
        elif token in REDIRECTS:
            skip = True
        else:
            current.append(token)
    segments.append(current)
    commands = []
    for seg in segments:
        for i, token in enumerate(seg[:-1]):
            if token == "-m" and seg[i + 1].split(".")[0] == "engine":
                commands.append((seg[i + 1], seg[i + 2:]))
                break
    return commands


def notebook_commands(nb) -> list[dict]:
    """Every engine command of the notebook: {"cell", "line", "module", "argv"}, in order."""
    ns = settings_namespace(nb)
    found = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for line in shell_lines(cell.source):
            for module, argv in engine_commands(expand(line, ns)):
                found.append({"cell": cell.get("id"), "line": line, "module": module, "argv": argv})
    return found


# ----------------------------------------------------------------------------- checking one command

def parse_argparse_cli(module: str, argv: list[str]) -> argparse.Namespace:
    """Parse argv with the module's own parser (no prefix matching); NotebookCheckError with
    argparse's message when it refuses."""
    target = importlib.import_module(ARGPARSE_CLIS[module])
    original = argparse.ArgumentParser.parse_args

    def strict_parse(parser, args=None, namespace=None):
        parser.allow_abbrev = False  # exact option names only
        raise _Parsed(original(parser, args, namespace))

    stderr = io.StringIO()
    with mock.patch.object(argparse.ArgumentParser, "parse_args", strict_parse), \
            contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            target.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
        except SystemExit:
            raise NotebookCheckError(f"python -m {module} {shlex.join(argv)}: "
                                     f"{stderr.getvalue().strip().splitlines()[-1]}") from None
    raise NotebookCheckError(f"python -m {module}: main() returned without parsing its arguments")


def check_hydra_cli(module: str, overrides: list[str], tmp_path: Path):
    """Compose the overrides with conf/ as `hydra.main` would and build + validate the RunConfig."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from engine.config import ConfigError, from_dict, register_configs

    where = f"python -m {module} {shlex.join(overrides)}"
    swapped = []
    for i, override in enumerate(overrides):
        if "=" not in override:
            raise NotebookCheckError(f"{where}: {override!r} is not a key=value override")
        key, value = override.split("=", 1)
        if key.lstrip("+~") == "experiment":
            if not (ROOT / "conf" / "experiment" / f"{value}.yaml").is_file():
                raise NotebookCheckError(f"{where}: experiment {value!r}: conf/experiment/{value}.yaml does not exist")
        kind = PATH_KEYS.get(key.lstrip("+"))
        if kind and value not in ("null", "default") and not value.startswith("shape:"):
            stand_in = tmp_path / f"arg{i}-{Path(value).name or 'x'}"
            if kind == "dir":
                stand_in.mkdir(parents=True, exist_ok=True)
            else:
                stand_in.write_text('{"text": "a line"}\n')
            override = f"{key}={stand_in}"
        swapped.append(override)
    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            dcfg = compose(config_name="config", overrides=swapped)
        return from_dict(OmegaConf.to_container(dcfg, resolve=True)).validate()
    except ConfigError as e:
        raise NotebookCheckError(f"{where}: {e}") from None
    except Exception as e:  # Hydra's own errors: unknown key, wrong type, missing group option
        raise NotebookCheckError(f"{where}: {type(e).__name__}: {e}") from None
    finally:
        GlobalHydra.instance().clear()


def check_command(module: str, argv: list[str], tmp_path: Path):
    if module in ARGPARSE_CLIS:
        return parse_argparse_cli(module, argv)
    if module in HYDRA_CLIS:
        return check_hydra_cli(module, argv, tmp_path)
    raise NotebookCheckError(f"python -m {module}: not an engine command "
                             f"(known: {', '.join(sorted([*ARGPARSE_CLIS, *HYDRA_CLIS]))})")


def check_source(source: str, settings: str, tmp_path: Path) -> list:
    """Check every engine command of a one-cell notebook body plus a Settings cell (for the negative tests)."""
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(settings, id=SETTINGS_CELL_ID), new_code_cell(source, id="body")])
    commands = notebook_commands(nb)
    assert commands, "the source holds no engine command"
    return [check_command(c["module"], c["argv"], tmp_path) for c in commands]


# ----------------------------------------------------------------------------- the notebook

def _commands() -> list[dict]:
    return notebook_commands(load_notebook()) if NOTEBOOK.is_file() else []


def test_notebook_is_valid_nbformat_v4_without_outputs():
    raw = json.loads(NOTEBOOK.read_text(encoding="utf-8"))
    assert raw["nbformat"] == 4
    nb = load_notebook()
    nbformat.validate(nb)  # raises ValidationError on a schema violation
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert code_cells and all(c.outputs == [] and c.execution_count is None for c in code_cells)
    ids = [c.id for c in nb.cells]
    assert len(ids) == len(set(ids)), "cell ids must be unique"
    assert nb.metadata["accelerator"] == "GPU" and nb.metadata["colab"]["gpuType"] == "T4"
    # each step is explained in markdown first; only these code cells follow another code cell
    assert nb.cells[0].cell_type == "markdown"
    for before, cell in zip(nb.cells, nb.cells[1:]):
        if cell.cell_type == "code" and before.cell_type == "code":
            assert cell.id in ("install-zip", "install-pip", "chat"), f"cell {cell.id!r} has no markdown before it"


def test_notebook_runs_the_seed_use_case():
    nb = load_notebook()
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    ns = settings_namespace(nb)
    assert "<-- SET THIS" in text and "YOUR-NAME" in ns["REPO_URL"], "REPO_URL must be a marked placeholder"
    assert ns["MODEL_ID"] == "microsoft/Phi-3-mini-128k-instruct" and "snapshot_download(MODEL_ID" in text
    assert ns["TRAIN"].endswith("formatted_train_set.jsonl") and ns["TEST"].endswith("formatted_test_set.jsonl")
    for needed in ("!nvidia-smi", "files.upload()", "drive.mount(", 'pip install -q -e "{ENGINE_DIR}[plot]"',
                   'Image(f"{RUN_DIR}/loss.png")', "summary.json", "scores.md"):
        assert needed in text, needed
    assert "torch==" not in text, "Colab's CUDA torch must not be replaced"

    by_module: dict[str, list] = {}
    for c in _commands():
        by_module.setdefault(c["module"], []).append(c["argv"])
    assert set(by_module) == {"engine.data", "engine.plan", "engine.train", "engine.plot",
                              "engine.evaluate", "engine.generate", "engine.export.merge"}
    train = by_module["engine.train"][0]
    assert by_module["engine.plan"][0] == train[:4], "plan and train must take the same overrides"
    assert train[0] == "+experiment=seed_msa_qlora"
    assert f"model.path={ns['MODEL_DIR']}" in train and f"output_dir={ns['RUN_DIR']}" in train
    assert f"data.train_path={ns['TRAIN']}" in train and f"data.eval_path={ns['TEST']}" in train
    data = by_module["engine.data"][0]
    assert data[:2] == [ns["TRAIN"], ns["TEST"]] and "--max-seq-len" in data
    evaluate = by_module["engine.evaluate"][0]
    assert "--generate" in evaluate and evaluate[evaluate.index("--adapter") + 1] == f"{ns['RUN_DIR']}/adapter"
    assert any("--prompt-file" in a for a in by_module["engine.generate"])
    assert any("--prompt" in a for a in by_module["engine.generate"])


def test_the_experiment_is_full_length_qlora_with_eval_before_and_after(tmp_path):
    train = next(c for c in _commands() if c["module"] == "engine.train")
    cfg = check_hydra_cli("engine.train", train["argv"], tmp_path)
    assert cfg.peft.method == "qlora" and cfg.peft.quant_type == "nf4" and cfg.peft.double_quant
    assert cfg.data.max_seq_len >= 4513, "the seed's longest conversation is 4,513 tokens (SmolLM2 tokenizer)"
    assert cfg.data.format == "messages_per_line" and cfg.data.loss_on == "assistant"
    assert cfg.train.precision == "auto" and cfg.eval.generate


@pytest.mark.parametrize("command", _commands(), ids=lambda c: f"{c['cell']}-{c['module']}")
def test_every_engine_command_exists_with_its_arguments(command, tmp_path):
    check_command(command["module"], command["argv"], tmp_path)


# ----------------------------------------------------------------------------- the checker can fail

SETTINGS = 'MODEL = "/content/m"\nDATA = "/content/d.jsonl"\nRUN = f"/content/runs/{MODEL}"\nN = 4608'


def test_checker_accepts_the_correct_forms(tmp_path):
    ns = check_source("!python -m engine.evaluate --model {MODEL} --data $DATA \\\n"
                      "    --max-seq-len {N} --max-new-tokens 5 && echo done", SETTINGS, tmp_path)[0]
    assert (ns.model, ns.data, ns.max_seq_len, ns.max_new_tokens) == ("/content/m", "/content/d.jsonl", 4608, 5)
    cfg = check_source("!python -m engine.train +experiment=seed_msa_qlora model.path={MODEL} \\\n"
                       "    data.train_path={DATA} data.eval_path=null train.max_steps=3", SETTINGS, tmp_path)[0]
    assert cfg.train.max_steps == 3 and cfg.peft.r == 32 and cfg.data.eval_path is None


@pytest.mark.parametrize("line, message", [
    ("!python -m engine.evaluate --model {MODEL} --data {DATA} --max-new-tokenz 5",
     "unrecognized arguments: --max-new-tokenz"),
    ("!python -m engine.evaluate --model {MODEL} --data {DATA} --max-new 5",  # a prefix is not enough
     "unrecognized arguments: --max-new"),
    ("!python -m engine.evaluate --model {MODEL}", "the following arguments are required: --data"),
    ("!python -m engine.generate --prompt hi --prompt-file {DATA}", "not allowed with argument"),
    ("!python -m engine.export.merge --adapter a --out o --gguf q4", "invalid choice: 'q4'"),
    ("!python -m engine.data {DATA} --max-seq-len {MODEL}", "invalid int value: '/content/m'"),
    ("!cd x && python -m engine.plot {RUN} --bogus", "unrecognized arguments: --bogus"),
    ("!python -m engine.evaluate --model {MODLE} --data {DATA}", "MODLE is not set in the Settings cell"),
    ("!python -m engine.trian +experiment=seed_msa_qlora", "engine.trian: not an engine command"),
])
def test_checker_rejects_bad_argparse_commands(line, message, tmp_path):
    with pytest.raises(NotebookCheckError, match=re.escape(message)):
        check_source(line, SETTINGS, tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ("+experiment=seed_msa_qlora model.path={MODEL} data.train_path={DATA} data.eval_path={DATA} train.max_stepz=3", "train.max_stepz"),
    ("+experiment=seed_msa_qlora model.path={MODEL} data.train_path={DATA} data.eval_path={DATA} peft.r=0",
     "config key 'peft.r': must be a positive integer, got 0"),
    ("+experiment=seed_msa_qlora model.path={MODEL} data.train_path={DATA} data.eval_path={DATA} data.max_seq_len=4",
     "config key 'data.max_seq_len': must be an integer >= 8"),
    ("+experiment=seed_msa_qlora model.path={MODEL} data.train_path={DATA} data.eval_path={DATA} peft=qlorra", "qlorra"),
    ("+experiment=no_such_experiment model.path={MODEL}", "conf/experiment/no_such_experiment.yaml does not exist"),
    ("+experiment=seed_msa_qlora model.path={MODEL} data.train_path={DATA} data.eval_path={DATA} --max-steps 3",
     "'--max-steps' is not a key=value override"),
])
@pytest.mark.parametrize("module", HYDRA_CLIS)
def test_checker_rejects_bad_hydra_overrides(module, overrides, message, tmp_path):
    with pytest.raises(NotebookCheckError, match=re.escape(message)):
        check_source(f"!python -m {module} {overrides}", SETTINGS, tmp_path)


def test_checker_rejects_a_settings_cell_that_runs_code(tmp_path):
    with pytest.raises(NotebookCheckError, match="Call is not a plain value"):
        check_source("!python -m engine.plot {RUN}", 'RUN = __import__("os").getcwd()', tmp_path)


def test_shell_lines_join_continuations_and_skip_python():
    source = 'x = "!not a command"\n  !python -m engine.plot \\\n      a \\\n   b\n# !python -m engine.export.merge\n!ls'
    assert shell_lines(source) == ["python -m engine.plot a b", "ls"]
    assert engine_commands("cd d && python -m engine.plot a > log.txt 2>&1; python -m engine.data f | tee r") == \
        [("engine.plot", ["a"]), ("engine.data", ["f"])]
    assert engine_commands("python -m engine.data f 2> err.txt --cache") == [("engine.data", ["f", "--cache"])]
    assert engine_commands("python -m engine.generate --system \"$(cat s.txt)\" --prompt 'a b'") == \
        [("engine.generate", ["--system", "$(cat s.txt)", "--prompt", "a b"])]
