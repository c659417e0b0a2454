"""The README stays true: CI runs its test command; every configuration key is documented."""

from __future__ import annotations

import re
from pathlib import Path

from common.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _quickstart_commands() -> list[str]:
    section = README.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [ln for block in blocks for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_quickstart_has_exactly_two_commands_and_ci_runs_the_test_one() -> None:
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "flower-sim run" in commands[0] and "pytest" in commands[1]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_every_configuration_key_is_documented() -> None:
    missing = [key for key in RunConfig().to_flat() if f"`{key}`" not in README]
    assert not missing
