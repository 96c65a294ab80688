"""Results files shared by several benchmark phases: each phase merges its own keys."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def merge_into(path: Path, keys: dict[str, Any]) -> None:
    """Read-modify-write ``path``: the keys other phases (and their owners) wrote stay."""
    out = json.loads(path.read_text()) if path.exists() else {}
    out.update(keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
