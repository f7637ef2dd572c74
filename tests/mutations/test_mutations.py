"""The mutation catalog stays honest: the committed report covers every mutation, each killed by
the default tier (checked here, cheaply, from report.json); the slow tier re-runs a sample that
rotates with the day, so over a few weeks every mutation is re-checked against today's tests."""
import datetime
import json
from pathlib import Path

import pytest

from tests.mutations.catalog import CATALOG
from tests.mutations.runner import ROOT, apply, run

REPORT = Path(__file__).with_name("report.json")
SAMPLE = 3


def test_catalog_is_large_and_named_once():
    names = [m.name for m in CATALOG]
    assert len(names) >= 30 and len(set(names)) == len(names)
    assert {m.hole for m in CATALOG if m.hole} == {"H1", "H2", "H3", "H4", "H5", "H6"}


def test_committed_report_covers_the_catalog_and_every_mutation_is_killed():
    outcomes = {o["name"]: o for o in json.loads(REPORT.read_text())["outcomes"]}
    assert set(outcomes) == {m.name for m in CATALOG}, "re-run python -m tests.mutations"
    for m in CATALOG:
        o = outcomes[m.name]
        assert o["verdict"] == "killed" and o["killed_by"], (m.name, o)
        assert o["path"] == m.path


def rotating_sample(day: datetime.date, k: int = SAMPLE):
    """k mutations, a different window of the catalog each day."""
    start = (day.toordinal() * k) % len(CATALOG)
    return [CATALOG[(start + i) % len(CATALOG)] for i in range(k)]


def test_rotating_sample_covers_the_catalog():
    days = [datetime.date(2026, 1, 1) + datetime.timedelta(d) for d in range(len(CATALOG))]
    assert {m.name for d in days for m in rotating_sample(d)} == {m.name for m in CATALOG}


@pytest.mark.parametrize("mutation", CATALOG, ids=lambda m: m.name)
def test_mutation_applies_to_todays_source(tmp_path, mutation):
    """The text each mutation replaces is still in the source, once (else the catalog is stale)."""
    target = tmp_path / mutation.path
    target.parent.mkdir(parents=True)
    target.write_text((ROOT / mutation.path).read_text())
    apply(mutation, tmp_path)
    assert mutation.new in target.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(SAMPLE))
def test_sampled_mutation_is_killed_by_the_default_tier(index):
    mutation = rotating_sample(datetime.date.today())[index]
    outcome = run(mutation, timeout=600)
    assert outcome.verdict == "killed", outcome
