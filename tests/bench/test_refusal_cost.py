"""`python -m bench.refusal_cost` measures both refusal paths, and both really refuse."""

from __future__ import annotations

import json
from pathlib import Path

from bench import refusal_cost


def test_both_paths_answer_429_and_are_timed(micro_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    args = ["--model-repository", str(micro_repository), "--requests", "20", "--rounds", "2"]
    assert refusal_cost.main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # The chunked upload passes the door and is refused by the route: the same answer.
    assert result["statuses"] == {"door": [429], "stack": [429]}
    assert all(len(rounds) == 2 for rounds in result["rounds_us"].values())
    assert all(us > 0 for us in result["us_per_refusal"].values())
