"""Every committed zoo entry reproduces its card: its bundle, as served, re-scored on the real data
the card names. The default suite re-scores the first episodes of every setting; the slow suite
the whole table."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewshot.artifacts.zoo import ZooEntry, list_entries, render_model_md, zoo_root
from fewshot.training.data import RunData
from fewshot.workflows.zoo import entry_data, verify

ENTRIES = list_entries()
QUICK_EPISODES = 40


def test_the_repository_has_a_zoo() -> None:
    assert ENTRIES, f"no zoo entries under {zoo_root()}"


@pytest.fixture(scope="module", params=ENTRIES, ids=[e.name for e in ENTRIES])
def entry_and_data(request: pytest.FixtureRequest, data_root: Path,
                   real_cache_root: Path) -> tuple[ZooEntry, RunData]:
    entry: ZooEntry = request.param
    return entry, entry_data(entry, root=str(data_root), cache_dir=str(real_cache_root))


@pytest.mark.integration
def test_entry_reproduces_its_card_on_the_first_episodes(entry_and_data: tuple[ZooEntry, RunData]) -> None:
    entry, data = entry_and_data
    assert (entry.path / "MODEL.md").read_text(encoding="utf-8") == render_model_md(entry.card())
    rows = verify(entry, data, episodes=QUICK_EPISODES)
    assert len(rows) == len(entry.card()["results"])


@pytest.mark.integration
@pytest.mark.slow
def test_entry_reproduces_its_whole_table(entry_and_data: tuple[ZooEntry, RunData]) -> None:
    entry, data = entry_and_data
    verify(entry, data)
