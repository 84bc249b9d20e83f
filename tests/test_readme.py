"""The README's promises: CI runs its test command; the commands it names exist."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    test_cmd = next(b.strip() for b in blocks if "pytest" in b)
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_readme_default_command_uses_the_entry_point_and_setup():
    readme = (REPO / "README.md").read_text()
    first = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)[0].strip()
    assert first.startswith("bash scripts/setup.sh") and "launch/train.py" in first
    assert (REPO / "scripts" / "setup.sh").is_file() and (REPO / "launch" / "train.py").is_file()
