"""``kill -9`` of one trainer rank: torchrun restarts every rank from the last global
checkpoint, and the state holds every produced event exactly once (``bench/rank_kill.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.rank_kill import kill_one_rank
from freshrec.settings import Settings
from freshrec.synthetic import SyntheticConfig, SyntheticStream

pytestmark = pytest.mark.integration


def test_kill_9_of_one_rank_loses_no_event_and_learns_none_twice(settings: Settings,
                                                                  tmp_path: Path) -> None:
    """Launched as shipped (``torchrun --max-restarts 1 freshrec trainer``). Rank 1 dies
    after the ranks learned part of the second share past a global checkpoint, and the third
    share arrives while they are down. Per item, the sightings its owner counted in the last
    global checkpoint equal the item's occurrences in the stream."""
    events = list(SyntheticStream(SyntheticConfig(seed=23, n_users=500, n_items=300))
                  .events(4500))
    result = kill_one_rank(settings, events, tmp_path)
    assert result.rounds_before_kill >= 1  # restarted from a checkpoint holding events
    # what the ranks had learned past that checkpoint was learned again (the kill lands
    # within ~0.1 s of the second share arriving, checkpoints are 2 s apart)
    assert result.relearned > 0
    assert result.trained == result.produced == len(events)
    assert result.lost_events == 0
    assert result.learned_twice == 0
    assert result.recovery_s > 0
