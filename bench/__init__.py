"""Benchmarks: each script prints a table and writes ``bench/results/NAME.json``.

They measure freshrec as shipped: the image installs the package with :data:`SHIPPED_EXTRAS`
(Dockerfile; tests/ops checks the two agree), and :func:`require_shipped_extras` stops a
benchmark whose environment lacks any of them, since e.g. the service without uvloop and
httptools is a different, slower service than the one deployed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TypeVar

Run = TypeVar("Run")

SHIPPED_EXTRAS = ("serve", "train")


def extra_requirements(extra: str) -> list[str]:
    """Distribution names the installed freshrec lists for ``extra``."""
    names = []
    for req in metadata.requires("freshrec") or []:
        if re.search(rf"""extra\s*==\s*["']{extra}["']""", req):
            names.append(re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0])
    return names


def require_shipped_extras() -> None:
    """Raise unless every requirement of the shipped extras is installed."""
    missing = []
    for extra in SHIPPED_EXTRAS:
        for name in extra_requirements(extra):
            try:
                metadata.version(name)
            except metadata.PackageNotFoundError:
                missing.append(f"{name} (freshrec[{extra}])")
    if missing:
        raise SystemExit("not measured as shipped, missing: " + ", ".join(missing)
                         + "; pip install -e '.[" + ",".join(SHIPPED_EXTRAS) + "]'")


def median_run(runs: Sequence[Run], rate: Callable[[Run], float]) -> Run:
    """The run of the median ``rate`` (of an odd count, the middle one): what a benchmark
    reports when one run is at the mercy of a slow moment of the machine. A NaN rate (a run
    that did not finish) counts as the slowest."""
    def key(run: Run) -> float:
        r = rate(run)
        return -math.inf if math.isnan(r) else r
    return sorted(runs, key=key)[len(runs) // 2]
