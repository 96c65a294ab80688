"""Which CPUs each serving worker is pinned to (``service_pin_workers``), for given masks."""

from __future__ import annotations

import pytest

import service.main as main
from freshrec.settings import Settings


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch):
    """Pretend the process' affinity mask is ``cpus`` and whether it owns them."""

    def set_machine(cpus: list[int], owned: bool = True) -> None:
        monkeypatch.setattr(main, "allowed_cpus", lambda: cpus)
        monkeypatch.setattr(main, "owns_cpus", lambda configured=None: owned)

    return set_machine


def test_one_worker_per_owned_cpu_is_pinned_by_default(machine) -> None:
    machine([2, 5])
    assert main.worker_cpus(Settings(), 2) == [{2}, {5}]


@pytest.mark.parametrize(("cpus", "owned", "workers"), [
    ([0, 1], False, 2),  # a quota below the mask: a share of CPUs, none of its own
    ([0, 1, 2, 3], True, 2),  # more CPUs than workers (e.g. a node's shared pool)
    ([0], True, 2),  # more workers than CPUs
    ([0, 1], True, 1),  # a single worker may use every CPU
])
def test_default_leaves_placement_to_the_scheduler(machine, cpus, owned, workers) -> None:
    machine(cpus, owned)
    assert main.worker_cpus(Settings(), workers) is None


def test_forced_pinning_deals_the_mask_and_off_never_pins(machine) -> None:
    machine([0, 1, 2, 3], owned=False)
    assert main.worker_cpus(Settings(service_pin_workers=True), 2) == [{0, 2}, {1, 3}]
    assert main.worker_cpus(Settings(service_pin_workers=True), 5) is None
    machine([0, 1])
    assert main.worker_cpus(Settings(service_pin_workers=False), 2) is None
