"""The README stays true: every option is documented, and the commands it gives exist."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from dreambooth.__main__ import COMMANDS
from dreambooth.common.config import Concept, TrainingConfig

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def test_every_option_is_in_the_readme():
    missing = [f.name for f in dataclasses.fields(TrainingConfig) if f"`{f.name}`" not in README]
    missing += [f.name for f in dataclasses.fields(Concept) if f"`{f.name}`" not in README]
    assert not missing, f"options missing from README.md: {missing}"


def test_every_cli_command_is_in_the_readme():
    assert all(f"python -m dreambooth {name}" in README for name in COMMANDS)


def test_quick_start_commands_are_in_the_readme():
    assert "make demo" in README and "make test" in README and "LANE=forge make test" in README
