"""Keep the README true: every setting is documented, with its flag, env var and default."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import Settings, available_cores

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
# Defaults that depend on the machine: how the README writes them, and their value here.
MACHINE_DEFAULTS = {"decode_threads": ("`min(4, cores)`", min(4, available_cores()))}


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_in_the_configuration_table(name: str) -> None:
    field = Settings.model_fields[name]
    flag, env = f"--{name.replace('_', '-')}", f"HIERA_{name.upper()}"
    rows = [line for line in README.splitlines() if line.startswith(f"| `{flag}` | `{env}` |")]
    assert len(rows) == 1, f"README configuration table lacks {flag} / {env}"
    value = field.get_default(call_default_factory=True)
    default = "—" if value is None or value == [] else f"`{value}`"
    if name in MACHINE_DEFAULTS:
        default, here = MACHINE_DEFAULTS[name]
        assert value == here
    assert f"| {default} |" in rows[0], f"README default for {flag} is stale"
