"""What an attacker with a clinician's account tried against a fresh portal: uploads that hold a web worker,
floods of photos, heatmaps, reports and rescores, logins behind the deploy proxy, reads that left no trace.

The portal runs under gunicorn as `gestalt web` does, with the production upload limit (20 MB a photo), one
trusted proxy (these requests play it: they carry X-Forwarded-For) and small per-user limits, so each limit is
reached in a few requests.
"""
from __future__ import annotations

import io
import itertools
import statistics
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image
from sqlalchemy import select

from shared.db import session_scope
from shared.models import AuditLog
from shared.stack import Process, free_port
from shared.users import create_token, find_user
from tests.conftest import PASSWORD, Portal, _env, new_user, wait_http
from tests.hostile_corpus import scan_bomb

pytestmark = pytest.mark.e2e
_clients = itertools.count(10)


@pytest.fixture(scope="module")
def portal(engines):
    env = {**_env(engines), "GESTALT_MAX_UPLOAD_MB": "20", "GESTALT_TRUSTED_PROXIES": "1",
           "GESTALT_PHOTO_RATE_LIMIT": "25 per hour", "GESTALT_HEATMAP_RATE_LIMIT": "3 per minute",
           "GESTALT_REPORT_RATE_LIMIT": "3 per minute", "GESTALT_RESCORE_RATE_LIMIT": "3 per minute"}
    env.pop("GESTALT_LOGIN_ADDRESS_RATE_LIMIT")  # the default per-address limit
    port = free_port()
    proc = Process("web-hostile", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers", "2"],
                   env, engines.logs / "test-web-hostile.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    yield url
    proc.stop()


def _address() -> str:
    return f"198.51.100.{next(_clients)}"  # documentation addresses, in a header only


class Client(Portal):
    """A browser behind the TLS proxy: every request carries the X-Forwarded-For the proxy adds."""

    def __init__(self, base: str, email: str | None = None, address: str | None = None):
        self.address = address or _address()
        super().__init__(base)
        self.http.headers["X-Forwarded-For"] = self.address
        if email:
            self.login(email)


def _png(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    buf = io.BytesIO()
    if size[0] * size[1] > 1e6:
        Image.new(mode, size).save(buf, format="PNG")
    else:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], len(mode)), dtype=np.uint8).squeeze(), mode) \
            .save(buf, format="PNG")
    return buf.getvalue()


def _attack_while_watching(base: str, attacker_email: str, case_id: int, files, attacks: int = 2):
    """``attacks`` concurrent uploads of ``files`` (each from its own session of the attacker's account) while
    another clinician reloads their case list; returns [(status, error, seconds)] and the page latencies."""
    sessions = [Client(base, attacker_email) for _ in range(attacks)]
    tokens = [s.csrf(f"/cases/{case_id}") for s in sessions]
    other = Client(base, new_user())
    other.http.get(base + "/")
    results, latencies = [], []

    def attack(session, token):
        start = time.perf_counter()
        r = session.upload(case_id, files, token=token)
        results.append((r.status_code, r.json().get("error", ""), time.perf_counter() - start))

    threads = [threading.Thread(target=attack, args=pair) for pair in zip(sessions, tokens, strict=True)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or len(latencies) < 5:
        start = time.perf_counter()
        assert other.http.get(base + "/").status_code == 200
        latencies.append(time.perf_counter() - start)
        time.sleep(0.05)
    for t in threads:
        t.join()
    return results, latencies


# ------------------------------------------------------------------------------------------- uploads
def test_a_scan_bomb_jpeg_is_refused_in_moments_while_others_are_served(portal):
    bomb = scan_bomb()
    email = new_user()
    case_id = Client(portal, email).create_case("PT-BOMB")
    results, latencies = _attack_while_watching(portal, email, case_id, [("bomb.jpg", bomb)])
    print(f"\n80,000-scan JPEG ({len(bomb) / 2**20:.1f} MB), two at once: "
          f"{[(s, round(t, 3)) for s, _, t in results]}; another user's page: max {max(latencies) * 1000:.0f} ms "
          f"over {len(latencies)} loads")
    for status, error, seconds in results:
        assert status == 413 and "more than 100 scans" in error and "bomb.jpg" in error, error
        assert seconds < 5
    assert max(latencies) < 1


def test_twenty_large_pngs_are_refused_in_moments_and_a_few_accepted_without_a_decode(portal):
    png = _png((6000, 6600))
    email = new_user()
    owner = Client(portal, email)
    case_id = owner.create_case("PT-PNG")
    files = [(f"large-{i}.png", png) for i in range(20)]
    results, latencies = _attack_while_watching(portal, email, case_id, files)
    print(f"\ntwenty 6000x6600 PNGs ({20 * len(png) / 2**20:.1f} MB) per request, two at once: "
          f"{[(s, round(t, 3)) for s, _, t in results]}; another user's page: max {max(latencies) * 1000:.0f} ms")
    for status, error, seconds in results:
        assert status == 413 and "792 megapixels" in error and "at most 250" in error, error
        assert seconds < 5
    assert max(latencies) < 1
    # Within the budget they are stored as their own chunks: nothing is decoded in the request.
    start = time.perf_counter()
    r = owner.upload(case_id, files[:3])
    print(f"three of them (119 MP): {r.status_code} in {time.perf_counter() - start:.3f} s")
    assert r.status_code == 201 and time.perf_counter() - start < 5
    owner.http.post(f"{portal}/cases/{case_id}/delete", data={"csrf_token": owner.csrf(f"/cases/{case_id}")})


def test_photos_per_request_and_per_user_are_limited(portal):
    user = Client(portal, new_user())
    case_id = user.create_case("PT-FLOOD")
    photos = [(f"p{i}.png", _png((64, 64), seed=i)) for i in range(27)]
    r = user.upload(case_id, photos[:21])
    assert r.status_code == 413 and "upload at most 20 at a time" in r.json()["error"], r.text
    assert user.upload(case_id, photos[:20]).status_code == 201
    r = user.upload(case_id, photos[20:26])  # 20 + 6 > 25 an hour
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0 and "too many photos" in r.json()["error"]
    assert user.upload(case_id, photos[20:25]).status_code == 201  # refused uploads did not count
    r = user.upload(case_id, photos[25:26])
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 60, r.headers
    other = Client(portal, new_user(), address=user.address)  # the same address: another account's own count
    assert other.upload(other.create_case("PT-OTHER"), photos[:1]).status_code == 201
    # The API's upload shares the count.
    r = user.http.post(f"{portal}/api/v1/cases/{case_id}/images", files=[("photo", photos[26])],
                       headers={"X-CSRFToken": user.csrf("/")})
    assert r.status_code == 429 and "Retry-After" in r.headers
    with session_scope() as s:
        refused = s.scalars(select(AuditLog.detail).where(AuditLog.action == "upload_refused",
                                                          AuditLog.target_id == str(case_id))).all()
    assert any("at most 20" in d["reason"] for d in refused)


def test_heatmaps_reports_and_rescores_are_limited_per_user(portal):
    user = Client(portal, new_user())
    case_id = user.create_case("PT-LIMITS")
    image_id = user.upload(case_id, [("p.png", _png((64, 64), seed=99))]).json()["images"][0]["id"]
    token = user.csrf("/")
    routes = {
        "reports": lambda: user.http.get(f"{portal}/cases/{case_id}/report"),
        "heatmaps": lambda: user.http.get(f"{portal}/cases/{case_id}/images/{image_id}/heatmap.png?syndrome=0"),
        "heatmaps (API)": lambda: user.http.get(
            f"{portal}/api/v1/cases/{case_id}/images/{image_id}/heatmap.png?syndrome=0"),
        "rescores": lambda: user.http.post(f"{portal}/api/v1/images/{image_id}/rescore",
                                           headers={"X-CSRFToken": token}),
    }
    for name in ("reports", "heatmaps", "rescores"):
        codes = [routes[name]().status_code for _ in range(3)]
        assert 429 not in codes, (name, codes)
        over = routes["heatmaps (API)" if name == "heatmaps" else name]()  # the page and the API share a count
        assert over.status_code == 429 and 0 < int(over.headers["Retry-After"]) <= 60, (name, over.status_code)
    other = Client(portal, new_user())
    assert other.http.get(f"{portal}/cases/{other.create_case('PT-L2')}/report").status_code == 200


def test_a_decode_past_the_cpu_budget_is_refused_and_the_worker_goes_on(engines, monkeypatch):
    """In-process, in the main thread as gunicorn's sync workers run requests: a photo that must be decoded and
    encoded afresh (transparent) is stopped by the processor-time budget mid-decode."""
    from shared.config import reload_settings
    from shared.ml.preprocess.imaging import decode_upload
    from tests.test_hardening import _client, _post

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (2500, 2500, 4), dtype=np.uint8), "RGBA").save(
        buf, format="PNG", compress_level=1)
    big = buf.getvalue()  # 6.25 MP, transparent: decoded and encoded afresh
    start = time.process_time()
    decode_upload(big, max_bytes=2**26, max_pixels=4e7, min_side=64, pixels=False)
    cost = time.process_time() - start
    monkeypatch.setenv("GESTALT_UPLOAD_CPU_SECONDS", "0.05")
    monkeypatch.setenv("GESTALT_MAX_UPLOAD_MB", "40")
    reload_settings()
    try:
        from web import create_app

        app = create_app({"RATELIMIT_STORAGE_URI": "memory://", "TESTING": False})
        client = _client(app)
        case_id = _post(client, "/api/v1/cases", json={"patient_ref": "PT-CPU", "sex": "female"}).get_json()["id"]
        start = time.process_time()
        r = _post(client, f"/api/v1/cases/{case_id}/images", data={"photo": (io.BytesIO(big), "big.png")})
        spent = time.process_time() - start
        assert r.status_code == 413 and "more than 0.05 s of processor time" in r.get_json()["error"], r.get_json()
        r = _post(client, f"/api/v1/cases/{case_id}/images",
                  data={"photo": (io.BytesIO(_png((64, 64), seed=5)), "small.png")})
        assert r.status_code == 201
    finally:
        monkeypatch.undo()
        reload_settings()
    print(f"\ndecoding the 6.25 MP transparent PNG costs {cost:.2f} s of CPU; the request (the test client's own "
          f"multipart encoding included) was refused after {spent:.2f} s")
    assert spent < cost


# ------------------------------------------------------------------------------------------- logins
def test_logins_behind_the_proxy_are_limited_per_account_and_per_address(portal):
    victim, bystander = new_user(), new_user()
    attacker = Client(portal)
    codes = [attacker.login(victim, "wrong password!").status_code for _ in range(11)]
    assert codes == [401] * 10 + [429], codes
    assert Client(portal).login(victim).status_code == 429  # the account, from anywhere, for a minute
    colleague = Client(portal, address=attacker.address)  # behind the same NAT as the attacker
    assert colleague.login(bystander).status_code == 302
    with session_scope() as s:
        login = s.scalars(select(AuditLog).where(AuditLog.action == "login", AuditLog.user_id == find_user(
            s, bystander).id)).one()
        assert login.ip == attacker.address  # the client's address, not the proxy's (127.0.0.1)
    spoofed = Client(portal, address=f"10.66.0.1, {_address()}")  # the client's own claim, then the proxy's entry
    assert spoofed.login(new_user()).status_code == 302
    with session_scope() as s:
        ips = s.scalars(select(AuditLog.ip).where(AuditLog.action == "login").order_by(AuditLog.id.desc())).first()
    assert ips == spoofed.address.split(", ")[1]
    sprayer = Client(portal)
    codes = [sprayer.login(f"nobody{i}-{time.time_ns()}@clinic.example", "wrong password!").status_code
             for i in range(31)]
    assert codes == [401] * 30 + [429], codes
    assert Client(portal).login(new_user(), "wrong password!").status_code == 401  # another address: not limited


def test_a_missing_account_answers_as_slowly_as_a_wrong_password(portal):
    email = new_user()

    def seconds(address_email: str) -> float:
        client = Client(portal)
        token = client.csrf("/login")
        start = time.perf_counter()
        client.http.post(portal + "/login", data={"csrf_token": token, "email": address_email,
                                                  "password": "wrong password!"}, allow_redirects=False)
        return time.perf_counter() - start

    existing = statistics.median(seconds(email) for _ in range(5))
    missing = statistics.median(seconds(f"ghost{i}-{time.time_ns()}@clinic.example") for i in range(5))
    print(f"\nwrong password: existing account {existing * 1000:.0f} ms, no such account {missing * 1000:.0f} ms")
    assert missing > 0.4 * existing  # without the dummy hash: about a twentieth


def test_password_changes_are_limited_and_audited(portal):
    email = new_user()
    user = Client(portal, email)
    token = user.csrf("/account/password")
    form = {"csrf_token": token, "current": "not my password", "new": "a new password 1", "repeat": "a new password 1"}
    codes = [user.http.post(portal + "/account/password", data=form).status_code for _ in range(11)]
    assert codes == [400] * 10 + [429], codes
    r = user.http.post(portal + "/account/password", data={**form, "current": PASSWORD})
    assert r.status_code == 429 and "Retry-After" in r.headers
    with session_scope() as s:
        failed = s.scalars(select(AuditLog).where(AuditLog.action == "password_change_failed",
                                                  AuditLog.user_id == find_user(s, email).id)).all()
    assert len(failed) == 10 and {a.ip for a in failed} == {user.address}


def test_an_api_token_works_whatever_cookies_the_request_carries(portal):
    owner, other = new_user(), new_user()
    with session_scope() as s:
        _, secret = create_token(s, find_user(s, owner), "script")
    mine = Client(portal, owner).create_case("PT-TOKEN-OWN")
    bearer = {"Authorization": f"Bearer {secret}", "X-Forwarded-For": _address()}
    # A jar with another user's live portal session, and one with a session made by another browser.
    live = Client(portal, other)
    stray = Client(portal)
    stray.http.headers["User-Agent"] = "another browser/1.0"
    stray.login(owner)
    for jar in (live.http.cookies, stray.http.cookies):
        r = requests.get(f"{portal}/api/v1/cases", headers=bearer, cookies=jar)
        assert r.status_code == 200, r.text
        assert [c["id"] for c in r.json()["cases"]] == [mine]  # the token's user, never the cookie's
    r = requests.get(f"{portal}/api/v1/cases", headers={**bearer, "Authorization": "Bearer gst_wrong"},
                     cookies=live.http.cookies)
    assert r.status_code == 401  # an invalid token is not rescued by a valid cookie


# ------------------------------------------------------------------------------------------- audited reads
def test_every_read_of_a_case_is_audited_polls_once_per_login(portal):
    email = new_user()
    user = Client(portal, email)
    case_id = user.create_case("PT-READS")
    image_id = user.upload(case_id, [("p.png", _png((64, 64), seed=42))]).json()["images"][0]["id"]
    with session_scope() as s:
        user_id = find_user(s, email).id
        since = s.scalar(select(AuditLog.id).order_by(AuditLog.id.desc()).limit(1))
    assert user.http.get(f"{portal}/", params={"q": "PT-READ"}).status_code == 200
    assert user.http.get(f"{portal}/api/v1/cases").status_code == 200
    for _ in range(3):
        assert user.http.get(f"{portal}/api/v1/cases/{case_id}", params={"poll": "1"}).status_code == 200
    assert user.http.get(f"{portal}/api/v1/cases/{case_id}").status_code == 200
    assert user.http.get(f"{portal}/cases/{case_id}/edit").status_code == 200
    assert user.http.get(f"{portal}/api/v1/images/{image_id}").status_code == 200
    Client(portal, email).case(case_id)  # another login of the same user polls: its own first poll is audited
    admin = Client(portal, new_user("admin"))
    admin.case(case_id)
    admin.case(case_id)
    with session_scope() as s:
        rows = s.scalars(select(AuditLog).where(AuditLog.id > since, AuditLog.action.in_(
            ["case_list", "case_view", "case_edit_view", "image_view"]))).all()
    mine = [(a.action, a.target_id, (a.detail or {}).get("poll")) for a in rows if a.user_id == user_id]
    lists = [a for a in rows if a.user_id == user_id and a.action == "case_list"]
    assert [a.detail.get("via") for a in lists] == [None, "api"] and lists[0].detail["q"] == "PT-READ"
    assert all(case_id in a.detail["cases"] for a in lists)
    assert mine.count(("case_view", str(case_id), True)) == 2  # three polls of one login, one of another
    assert ("case_view", str(case_id), False) in mine and ("case_edit_view", str(case_id), None) in mine
    assert ("image_view", str(image_id), None) in mine
    assert len([a for a in rows if a.user_id != user_id and a.action == "case_view"]) == 1  # the admin's poll
