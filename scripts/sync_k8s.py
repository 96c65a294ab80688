"""Copy the files k8s/ turns into ConfigMaps from their sources into k8s/ (or check they match).

    python scripts/sync_k8s.py          # after editing dashboards/*.json or the model config
    python scripts/sync_k8s.py --check  # exit 1 and name the stale copies (tests/ops runs this)

kustomize's default load restrictor (the one Argo CD and Flux use) refuses files outside the
kustomization's directory, so ``kubectl apply -k k8s/`` can only read copies that live below
k8s/. The sources stay where the code and compose read them; these copies follow them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"


def copies() -> dict[Path, Path]:
    """Copy in k8s/ -> its source in the repository."""
    pairs = {K8S / "model" / "movielens.toml": ROOT / "freshrec" / "configs" / "movielens.toml"}
    for source in sorted((ROOT / "dashboards").glob("*.json")):
        pairs[K8S / "dashboards" / source.name] = source
    return pairs


def stale() -> list[Path]:
    """Copies that differ from their source, are missing, or have no source any more."""
    pairs = copies()
    out = [copy for copy, source in pairs.items()
           if not copy.is_file() or copy.read_bytes() != source.read_bytes()]
    out += [orphan for orphan in sorted((K8S / "dashboards").glob("*.json"))
            if orphan not in pairs]
    return out


def sync() -> list[Path]:
    """Write every stale copy, remove orphans; returns what changed."""
    pairs = copies()
    changed = stale()
    for copy in changed:
        if copy in pairs:
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_bytes(pairs[copy].read_bytes())
        else:
            copy.unlink()
    return changed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only report stale copies")
    args = ap.parse_args()
    paths = stale() if args.check else sync()
    for path in paths:
        print(f"{'stale' if args.check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if args.check and paths else 0


if __name__ == "__main__":
    sys.exit(main())
