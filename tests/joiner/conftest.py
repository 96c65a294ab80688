"""A joiner process whose Kafka clients are created but never reach a broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from freshrec.settings import Settings
from joiner.join import decode_labels
from joiner.process import JoinerProcess


def offline_process(checkpoint_dir: Path) -> JoinerProcess:
    """A :class:`JoinerProcess` fed in memory (window 5 s, lateness 0.5 s)."""
    s = Settings(kafka_bootstrap="127.0.0.1:9", joiner_checkpoint_dir=checkpoint_dir,
                 joiner_window_s=5.0, joiner_lateness_s=0.5, joiner_metrics_port=0)
    return JoinerProcess(s)


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[JoinerProcess]:
    """Dead-letter reasons in ``p.dead``, emitted events in ``p.emitted_events``."""
    p = offline_process(tmp_path / "ckpt")
    p.dead = []
    p._dead_letter = lambda raw, key, source, reason: p.dead.append(reason)
    p._emit = lambda labels, label: p.__dict__.setdefault("emitted_events", []).extend(
        decode_labels(labels))
    yield p
    p._consumer.close()
