"""kill -9 mid-stream, restart: the trainer resumes from its checkpoint and skips nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream
from tests.conftest import settings_env
from tests.integration.kafka_helpers import produce_events

pytestmark = pytest.mark.integration

N = 20_000


def committed_in_checkpoint(checkpoint_dir: Path, topic: str) -> int:
    """Events covered by the latest checkpoint (sum of next offsets), 0 if none."""
    latest = checkpoint_dir / "LATEST"
    if not latest.is_file():
        return 0
    manifest = json.loads((checkpoint_dir / latest.read_text().strip() / "manifest.json")
                          .read_text())
    return sum(manifest["offsets"].get(topic, {}).values())


def start_trainer(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "freshrec.cli", "trainer"], env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill_9_mid_stream_resumes_from_checkpoint(settings: Settings, tmp_path: Path) -> None:
    events = list(SyntheticStream(SyntheticConfig(seed=9)).events(N))
    produce_events(settings.kafka_bootstrap, settings.topic_events, events)
    audit = tmp_path / "audit.log"
    env = settings_env(settings, trainer_checkpoint_interval_s=0.3,
                       trainer_batch_max_events=200, trainer_audit_log=audit)
    ckpt_dir, topic = settings.trainer_checkpoint_dir, settings.topic_events

    first = start_trainer(env, tmp_path / "trainer-1.log")
    try:
        wait_for(lambda: committed_in_checkpoint(ckpt_dir, topic) >= 2000, 90,
                 "a first checkpoint")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    at_kill = committed_in_checkpoint(ckpt_dir, topic)
    assert 0 < at_kill < N, "the kill must land mid-stream"
    applied_before = audit.read_text().split()

    second = start_trainer(env, tmp_path / "trainer-2.log")
    try:
        wait_for(lambda: committed_in_checkpoint(ckpt_dir, topic) == N, 120, "the whole stream")
        second.send_signal(signal.SIGTERM)
        assert second.wait(30) == 0
    finally:
        if second.poll() is None:
            second.kill()

    applied = audit.read_text().split()
    assert set(applied) == {e["event_id"] for e in events}  # every event at least once
    # It resumed rather than starting over: only events after the checkpoint were re-applied.
    replayed = len(applied) - len(applied_before)
    assert replayed == N - at_kill
    assert len(applied) < 2 * N
