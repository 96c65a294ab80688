"""MovieLens loading in both layouts, from small generated samples, and the synthetic stream."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
import pytest

from featurestore.events import parse_labeled_event
from freshrec.data import DataError, fetch_movielens, load_movielens
from freshrec.synthetic import SyntheticConfig, SyntheticStream


def write_grouplens_sample(path: Path) -> None:
    """Five ratings by two users in GroupLens layout, deliberately out of time order."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "u.data").write_text(
        "1\t10\t5\t300\n2\t11\t3\t100\n1\t11\t4\t200\n2\t10\t1\t500\n1\t12\t2\t400\n")
    (path / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    flags = "|".join(["0"] * 19)
    (path / "u.item").write_text(
        f"10|Movie A (1995)|01-Jan-1995||http://x|0|1|{'|'.join(['0'] * 17)}\n"
        f"11|Movie B (1977)|01-Jan-1977||http://x|{flags}\n"
        f"12|Movie C|||http://x|{flags}\n")


def test_grouplens_layout_is_converted_and_time_ordered(tmp_path: Path) -> None:
    write_grouplens_sample(tmp_path / "gl")
    directory = fetch_movielens(tmp_path / "gl", cache_dir=tmp_path / "cache")
    ml = load_movielens(directory)
    assert len(ml) == 5
    assert np.all(np.diff(ml.timestamps) >= 0)
    events = list(ml.events())
    assert [e["label"] for e in events] == [0, 1, 1, 0, 0]  # ratings 3,4,5,2,1 in time order
    first_a = next(e for e in events if e["item_id"] == "10")
    assert first_a["features"]["genres"] == ["Action"]
    assert first_a["features"]["release_year"] == "1995"
    assert first_a["features"]["zip_prefix"] == "85"
    for e in events:
        parse_labeled_event(orjson.dumps(e))


def test_unknown_layout_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="neither GroupLens"):
        fetch_movielens(tmp_path)


def test_synthetic_events_validate_and_carry_ground_truth() -> None:
    stream = SyntheticStream(SyntheticConfig(n_users=1_000_000, new_items_per_s=50, seed=3))
    events = list(stream.events(20_000, chunk_size=5000))
    for e in events[:500]:
        parse_labeled_event(orjson.dumps(e))
    p = np.array([e["p_true"] for e in events])
    labels = np.array([e["label"] for e in events])
    assert abs(labels.mean() - p.mean()) < 0.02  # labels are drawn from p_true
    assert len({e["user_id"] for e in events}) > 5_000  # Zipf tail: many distinct users
    ts = np.array([e["ts"] for e in events])
    assert np.all(np.diff(ts) > 0)
    late_items = {e["item_id"] for e in events[-2000:]}
    newest = {f"i{i}" for i in range(stream.config.n_items, stream.live_items(ts[-1]))}
    assert late_items & newest  # items that did not exist at the start get traffic


def test_synthetic_stream_is_deterministic() -> None:
    a = SyntheticStream(SyntheticConfig(seed=7)).chunk(100)
    b = SyntheticStream(SyntheticConfig(seed=7)).chunk(100)
    assert a == b


def test_a_download_failing_verification_is_never_cached(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import freshrec.data as data

    def offline(dst: Path, timeout: float) -> None:
        raise OSError("offline")

    def tampered_wheel(dst: Path) -> None:
        dst.mkdir(parents=True, exist_ok=True)
        for name in data.RECBOLE_SHA256:
            (dst / name).write_text("user_id:token\n")

    monkeypatch.setattr(data, "_fetch_grouplens", offline)
    monkeypatch.setattr(data, "_fetch_recbole_wheel", tampered_wheel)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fetch_movielens(cache_dir=cache)
    # The next run must not pick up the unverified files as a valid cache.
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        fetch_movielens(cache_dir=cache)
    assert not (cache / "ml-100k").exists()
    assert [p.name for p in cache.iterdir()] == []
