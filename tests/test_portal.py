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
