"""Benchmarks: each script prints a table and writes ``bench/results/NAME.json``.

They measure freshrec as shipped: the image installs the package with :data:`SHIPPED_EXTRAS`
(Dockerfile; tests/ops checks the two agree), and :func:`require_shipped_extras` stops a
benchmark whose environment lacks any of them, since e.g. the service without uvloop and
httptools is a different, slower service than the one deployed.
"""

from __future__ import annotations

import re
from importlib import metadata

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
