"""Clinician pages over HTTP: the case list's search, filters and sorting; the printable report."""
from __future__ import annotations

import re

from tests.conftest import Portal, new_user


def _refs(html: str) -> list[str]:
    return re.findall(r'<td><a href="/cases/\d+">([^<]+)</a></td>', html)


def test_case_list_search_filter_sort(engines, web_server):
    portal = Portal(web_server, new_user())
    for ref, age in (("PT-LIST-B", "9"), ("PT-LIST-A", "3"), ("XX-OTHER", "")):
        token = portal.csrf("/cases/new")
        portal.http.post(web_server + "/cases/new", data={"csrf_token": token, "patient_ref": ref, "sex": "male",
                                                          "age_years": age})
    page = portal.http.get(web_server + "/", params={"q": "list", "sort": "patient", "dir": "asc"}).text
    assert _refs(page) == ["PT-LIST-A", "PT-LIST-B"]
    page = portal.http.get(web_server + "/", params={"q": "PT-LIST", "sort": "age", "dir": "desc"}).text
    assert _refs(page) == ["PT-LIST-B", "PT-LIST-A"]
    page = portal.http.get(web_server + "/", params={"status": "diagnosed"}).text
    assert _refs(page) == []
    page = portal.http.get(web_server + "/", params={"status": "undiagnosed", "sort": "bogus"}).text
    assert set(_refs(page)) == {"PT-LIST-A", "PT-LIST-B", "XX-OTHER"}


def test_printable_report_is_audited(engines, web_server):
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-REPORT")
    r = portal.http.get(f"{web_server}/cases/{case_id}/report")
    assert r.status_code == 200 and "Facial analysis report" in r.text and "@media print" not in r.text
    stranger = Portal(web_server, new_user())
    assert stranger.http.get(f"{web_server}/cases/{case_id}/report").status_code == 404
    admin = Portal(web_server, new_user("admin"))
    assert "report_export" in admin.http.get(web_server + "/admin/audit", params={"action": "report_export"}).text


def test_new_case_with_ancestry_and_hpo_terms(engines, web_server):
    from tests.test_catalog import ensure_catalog

    ensure_catalog()
    portal = Portal(web_server, new_user())
    form = portal.http.get(web_server + "/cases/new").text
    assert 'data-autocomplete="/api/v1/hpo"' in form and "/static/autocomplete.js" in form
    token = portal.csrf("/cases/new")
    bad = portal.http.post(web_server + "/cases/new", data={
        "csrf_token": token, "patient_ref": "PT-HPO-BAD", "sex": "male", "hpo_terms": "HP:0000316\nHP:9999999"})
    assert bad.status_code == 400 and "unknown HPO terms: HP:9999999" in bad.text
    r = portal.http.post(web_server + "/cases/new", data={
        "csrf_token": token, "patient_ref": "PT-HPO", "sex": "male", "ancestry": "East Asian",
        "hpo_terms": "HP:0000316 Hypertelorism\nHP:0000347"}, allow_redirects=False)
    assert r.status_code == 302, r.text
    case_id = int(r.headers["Location"].rstrip("/").split("/")[-1])
    payload = portal.case(case_id)
    assert payload["ancestry"] == "East Asian"
    assert payload["hpo_terms"] == [{"id": "HP:0000316", "name": "Hypertelorism"},
                                    {"id": "HP:0000347", "name": "Micrognathia"}]
    page = portal.http.get(f"{web_server}/cases/{case_id}").text
    assert "HP:0000316 Hypertelorism" in page and 'data-autocomplete="/api/v1/syndromes"' in page

    token = portal.csrf(f"/cases/{case_id}")
    r = portal.http.post(f"{web_server}/cases/{case_id}/diagnosis", data={
        "csrf_token": token, "syndrome": "Kabuki syndrome (ORPHA:2322)", "kind": "molecular", "gene": "KMT2D",
        "variant": "c.1A>G"})
    assert r.status_code == 200 and "Diagnosis recorded." in r.text
    diagnosis = portal.case(case_id)["diagnosis"]
    assert diagnosis["syndrome"]["orpha"] == "ORPHA:2322" and "KMT2D" in diagnosis["syndrome"]["genes"]
    assert (diagnosis["kind"], diagnosis["gene"], diagnosis["variant"]) == ("molecular", "KMT2D", "c.1A>G")
    assert 'value="Kabuki syndrome (ORPHA:2322)"' in r.text
    r = portal.http.post(f"{web_server}/cases/{case_id}/diagnosis", data={
        "csrf_token": token, "syndrome": "Not a syndrome (OMIM:9999999)", "kind": "clinical"})
    assert "unknown syndrome" in r.text and portal.case(case_id)["diagnosis"]["syndrome"]["orpha"] == "ORPHA:2322"
