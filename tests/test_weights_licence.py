"""Shipped weights are trained on redistributable data only: every committed checkpoint's JSON names its corpora,
and each is in `data.corpus.REDISTRIBUTABLE` (GRID, CC BY 4.0). The shared clips serve evaluation only."""

from __future__ import annotations

import json

import pytest

from lipsync_cli import models
from lipsync_cli.data.corpus import REDISTRIBUTABLE, training_data

SHIPPED = sorted(p for p in models.WEIGHTS.glob("*.json"))


def corpora(doc: dict) -> list[str]:
    data = doc.get("data") or {}
    if "corpora" in data:
        return data["corpora"]
    return training_data(data.get("speakers", []))["corpora"]  # older JSONs list `corpus/speaker` names only


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_checkpoint_names_only_redistributable_corpora(path):
    doc = json.loads(path.read_text())
    found = corpora(doc)
    assert found, f"{path.name} does not record its training corpora (config 'data')"
    bad = sorted(set(found) - set(REDISTRIBUTABLE))
    assert not bad, f"{path.name} was trained on {bad}, which may not be redistributed"
    assert "licences" in doc["data"] and all(doc["data"]["licences"][c] == REDISTRIBUTABLE[c] for c in found)


def test_training_data_records_corpora_and_licences():
    d = training_data(["grid/s4", "grid/s1", "shared/pcavs_00086"])
    assert d["corpora"] == ["grid", "shared"] and d["speakers"][0] == "grid/s1"
    assert d["licences"]["grid"].startswith("CC BY 4.0") and d["licences"]["shared"] == "not redistributable"
