"""The operator app's REST API on a live server (a thread on 127.0.0.1): every endpoint
and parameter, logins and roles, XSRF, throttling, path traversal and SQL injection."""

from __future__ import annotations

import io
import re
import sqlite3
import time
import urllib.parse
from pathlib import Path

import httpx
import numpy as np
import pytest

from app_data import PASSWORDS, LiveApp
from contimg.app import api
from contimg.app.accounts import Accounts
from contimg.state import StateDB, StateError

# one keep-alive client for the token requests (a new httpx client per request costs more
# than the request); the login flows use their own clients (cookies)
_C = httpx.Client(timeout=30)

INJECTIONS = ["' OR '1'='1", "1; DROP TABLE groups; --", "1 OR 1=1", "%' --",
              "x'); DELETE FROM users; --", "\" OR \"\"=\"", "1 UNION SELECT * FROM users"]


@pytest.fixture(scope="module")
def data(app_data):
    return app_data


@pytest.fixture(scope="module")
def app(data):
    with LiveApp(data, max_failures=3, backoff_s=3.0) as a:
        yield a


def _h(data, who):
    return {"Authorization": f"Bearer {data['tokens'][who]}"}


def _get(app, data, path, who="vera", **kw):
    return _C.get(app.url + path, headers=_h(data, who) if who else {}, timeout=30, **kw)


def _db_fingerprint(path):
    """Every table's row count and content hash: what an attack must not change."""
    con = sqlite3.connect(path)
    out = {}
    for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
        rows = con.execute(f"SELECT * FROM {name}").fetchall()   # noqa: S608 (own names)
        out[name] = hash(tuple(sorted(map(repr, rows))))
    con.close()
    return out


def _no_fallback_html(r):
    assert r.headers["content-type"].startswith("application/json"), r.text[:200]
    body = r.json()
    assert body["status"] == r.status_code and body["error"], body
    return body["error"]


def test_health_and_openapi_need_no_login(app):
    r = _C.get(app.url + "/api/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    r = _C.get(app.url + "/api/openapi.json")
    assert r.status_code == 200 and r.json()["openapi"].startswith("3.")


def test_openapi_lists_exactly_the_served_routes(app):
    doc = _C.get(app.url + "/api/openapi.json").json()
    served = set()
    for rule in app.server._tornado.wildcard_router.rules:
        regex = getattr(rule.matcher, "regex", None)
        if regex is not None and regex.pattern.startswith("/api"):
            served.add(regex.pattern)
    documented = {re.sub(r"\{[^}]+\}", "([^/]+)", p) + "$" for p in doc["paths"]}
    assert documented == served
    assert len(documented) == 15
    # the methods documented are the methods the handlers implement
    for path, ops in doc["paths"].items():
        handler = next(h for p, h, *_ in api.ROUTES if p == path)
        for m in ops:
            assert m.upper() in handler.SUPPORTED_METHODS and getattr(handler, m) is not \
                getattr(api.ApiHandler, m)


def _concrete(path, data):
    return (path.replace("{group_id}", data["groups"][0])
            .replace("{id}", str(next(iter(data["images"].values())))))


def test_every_endpoint_but_health_needs_a_login(app, data):
    for path, handler, method, *_ in api.ROUTES:
        if handler.role is None:
            continue
        url = app.url + _concrete(path, data)
        for headers in ({}, {"Authorization": "Bearer ctk_not-a-token"},
                        {"Authorization": "Basic dmVyYTp2aWV3ZXItcGFzcy0x"},
                        {"Authorization": f"Bearer {data['tokens']['vera']}x"},
                        {"Cookie": "contimg_session=forged"}):
            r = _C.request(method.upper(), url, headers=headers)
            assert r.status_code == 401, (path, headers, r.status_code)
            assert "login" in _no_fallback_html(r)


def test_endpoints_return_what_the_database_has(app, data):
    db = StateDB(data["db_path"])
    s = _get(app, data, "/api/status").json()
    assert s["counts"] == db.counts() and s["completed_last_hour"] >= 0
    assert s["newest_image"]["id"] == max(data["images"].values())   # newest with a thumbnail
    g = _get(app, data, "/api/groups").json()["groups"]
    assert [x["group_id"] for x in g] == sorted(data["groups"], reverse=True)
    failed = _get(app, data, "/api/groups?state=failed").json()["groups"]
    assert [x["group_id"] for x in failed] == [k for k, v in data["states"].items()
                                               if v == "failed"]
    assert failed[0]["error"] == "convert: subband 3 unreadable"
    assert len(_get(app, data, "/api/groups?limit=2").json()["groups"]) == 2
    since = data["groups"][3]
    assert ({x["group_id"] for x in _get(app, data, f"/api/groups?since={since}Z").json()
             ["groups"]} == set(data["groups"][3:]))
    t3 = db.group(since)["t_start"]
    assert len(_get(app, data, f"/api/groups?since={t3 + 1}").json()["groups"]) == 2
    one = _get(app, data, f"/api/groups/{data['groups'][1]}").json()
    assert one["state"] == "completed" and one["measurement_sets"][0]["calset_id"] == \
        data["calset"]
    assert [e["to_state"] for e in one["events"]] == ["pending", "in_progress", "completed"]
    assert {t["stage"] for t in one["timings"]} == {"convert", "flag", "image", "total"}
    row = next(x for x in g if x["group_id"] == data["groups"][1])
    assert row["stages"]["convert"] == 13.0 and row["calset"] == data["groups"][1]
    assert row["image_id"] == data["images"][data["groups"][1]]
    ms = _get(app, data, "/api/ms_index").json()["ms"]
    assert len(ms) == 1 and ms[0]["stage"] == "imaged" and ms[0]["status"] == "completed"
    assert _get(app, data, "/api/ms_index?stage=imaged&status=completed&limit=5").json()["ms"]
    assert _get(app, data, "/api/ms_index?stage=converted").json()["ms"] == []
    assert _get(app, data, "/api/ms_index?status=failed").json()["ms"] == []
    cs = _get(app, data, "/api/calibration_sets").json()["calibration_sets"]
    rej = next(c for c in cs if c["status"] == "rejected")
    assert rej["reason"] == "bandpass SNR 2.1 below 5"
    assert next(c for c in cs if c["id"] == data["calset"])["groups"] == [data["groups"][1]]
    ims = _get(app, data, "/api/images").json()["images"]
    assert len(ims) == 5 and len(_get(app, data, "/api/images?limit=2").json()["images"]) == 2
    assert _get(app, data, f"/api/images?since={time.time() + 60}").json()["images"] == []
    iid = data["images"][data["groups"][0]]
    im = _get(app, data, f"/api/images/{iid}").json()
    assert im["qa"]["n_components"] == 37 and im["qa"]["dynamic_range"] == pytest.approx(600)
    src = _get(app, data, "/api/sources").json()
    assert [s["n_points"] for s in src["sources"]] == [3, 3]
    assert src["inventory"]["have"]["ese_candidates"] == 2
    lc = _get(app, data, f"/api/sources/{data['sources'][0]}/lightcurve").json()
    assert len(lc["points"]) == 3 and lc["source"]["name"] == "J1000+5430"
    assert all(abs(p["flux_jy"] - 1.2) < 0.1 for p in lc["points"])
    ese = _get(app, data, "/api/ese/candidates").json()
    assert ese["available"] and [c["score"] for c in ese["candidates"]] == [9.0, 6.5]
    assert ese["candidates"][0]["source_id"] == data["sources"][1]
    assert len(_get(app, data, "/api/ese/candidates?limit=1").json()["candidates"]) == 1


def test_downloads(app, data):
    from astropy.io import fits

    iid = data["images"][data["groups"][0]]
    r = _get(app, data, f"/api/images/{iid}/fits")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fits"
    assert "attachment" in r.headers["content-disposition"]
    with fits.open(io.BytesIO(r.content)) as h:
        ref = fits.getdata(data["products"] / "images" / f"{data['groups'][0]}-image.fits")
        assert np.array_equal(h[0].data, ref)
    r = _get(app, data, f"/api/images/{iid}/fits?product=residual")
    assert r.status_code == 200 and len(r.content) > 2880
    r = _get(app, data, f"/api/images/{iid}/fits?product=psf")
    assert r.status_code == 404 and "psf" in _no_fallback_html(r)
    r = _get(app, data, f"/api/images/{iid}/thumbnail")
    assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_parameters_are_400_with_a_message(app, data):
    cases = {"/api/groups?state=bogus": "state", "/api/groups?limit=abc": "limit",
             "/api/groups?limit=0": "limit", "/api/groups?limit=100001": "limit",
             "/api/groups?since=yesterday": "since", "/api/groups?since=nan": "since",
             "/api/ms_index?stage=done": "stage", "/api/ms_index?status=x": "status",
             "/api/ms_index?limit=-1": "limit", "/api/images?since=2026-13-45": "since",
             "/api/images?limit=1e3": "limit", "/api/images/abc": "id",
             "/api/images/0": "id", "/api/images/abc/fits": "id",
             "/api/images/1/fits?product=../../etc/passwd": "product",
             "/api/images/abc/thumbnail": "id", "/api/sources?limit=x": "limit",
             "/api/sources/x/lightcurve": "id", "/api/ese/candidates?limit=zz": "limit"}
    for path, name in cases.items():
        r = _get(app, data, path)
        assert r.status_code == 400, (path, r.status_code)
        assert repr(name) in _no_fallback_html(r), path


def test_unknown_objects_are_404(app, data):
    for path in ("/api/groups/2030-01-01T00:00:00", "/api/images/9999",
                 "/api/images/9999/fits", "/api/images/9999/thumbnail",
                 "/api/sources/9999/lightcurve"):
        r = _get(app, data, path)
        assert r.status_code == 404, path
        assert "not in the state database" in _no_fallback_html(r)
    r = _C.post(app.url + "/api/reprocess/2030-01-01T00:00:00", headers=_h(data, "otto"))
    assert r.status_code == 404 and "not in the state database" in _no_fallback_html(r)


def test_reprocess_roles_and_semantics(app, data):
    db = StateDB(data["db_path"])
    gid = data["groups"][0]
    before = _db_fingerprint(data["db_path"])
    r = _C.post(f"{app.url}/api/reprocess/{gid}", headers=_h(data, "vera"))
    assert r.status_code == 403 and "operator" in _no_fallback_html(r)
    assert _db_fingerprint(data["db_path"]) == before and db.group(gid)["state"] == "completed"
    assert gid not in [x["group_id"] for x in _get(app, data, "/api/groups?state=pending")
                       .json()["groups"]]          # (a response now cached for a second)
    r = _C.post(f"{app.url}/api/reprocess/{gid}", headers=_h(data, "otto"))
    assert r.status_code == 200 and r.json() == {"group_id": gid, "state": "pending"}
    # the API's short response cache does not hide the change
    assert gid in [x["group_id"] for x in _get(app, data, "/api/groups?state=pending")
                   .json()["groups"]]
    g = db.group(gid)
    assert g["state"] == "pending" and g["retries"] == 0
    ev = db.events(gid)[-1]
    assert (ev["from_state"], ev["to_state"]) == ("completed", "pending")
    assert ev["reason"] == "reprocess by otto (operator app)"
    r = _C.post(f"{app.url}/api/reprocess/{gid}", headers=_h(data, "otto"))
    assert r.status_code == 409 and "pending" in _no_fallback_html(r)
    inprog = next(k for k, v in data["states"].items() if v == "in_progress")
    r = _C.post(f"{app.url}/api/reprocess/{inprog}", headers=_h(data, "ada"))
    assert r.status_code == 409 and db.group(inprog)["state"] == "in_progress"
    failed = next(k for k, v in data["states"].items() if v == "failed")
    r = _C.post(f"{app.url}/api/reprocess/{failed}", headers=_h(data, "ada"))
    assert r.status_code == 200 and db.group(failed)["state"] == "pending"
    # GET is not a way around it
    assert _get(app, data, f"/api/reprocess/{gid}", "otto").status_code == 405


def _login(client, url, user, password, next_="/overview"):
    client.get(url + "/login")
    return client.post(url + "/login", data={"username": user, "password": password,
                                             "next": next_,
                                             "_xsrf": client.cookies.get("_xsrf")})


def test_browser_session_cookie_and_xsrf(app, data):
    with httpx.Client() as c:
        r = _login(c, app.url, "vera", "wrong-password")
        assert r.status_code == 401 and "Wrong user name or password" in r.text
        assert "contimg_session" not in c.cookies
        r = _login(c, app.url, "otto", PASSWORDS["otto"], next_="//evil.example/x")
        assert r.status_code == 302 and r.headers["location"] == "/overview"
        sc = r.headers["set-cookie"]
        assert "contimg_session=" in sc and "HttpOnly" in sc and "SameSite=Lax" in sc
        assert c.get(app.url + "/api/status").status_code == 200
        gid = next(k for k, v in data["states"].items() if v == "completed"
                   and StateDB(data["db_path"]).group(k)["state"] == "completed")
        # a cookie-authenticated POST without the XSRF token is refused, and changes nothing
        r = c.post(f"{app.url}/api/reprocess/{gid}")
        assert r.status_code == 403 and "XSRF" in _no_fallback_html(r)
        r = c.post(f"{app.url}/api/reprocess/{gid}", headers={"X-XSRFToken": "forged"})
        assert r.status_code == 403
        assert StateDB(data["db_path"]).group(gid)["state"] == "completed"
        r = c.post(f"{app.url}/api/reprocess/{gid}",
                   headers={"X-XSRFToken": c.cookies.get("_xsrf")})
        assert r.status_code == 200 and StateDB(data["db_path"]).group(gid)["state"] == "pending"
        # a page needs the login; with it, the page is served
        assert c.get(app.url + "/groups").status_code == 200
    with httpx.Client() as c:   # the login form itself is XSRF-protected
        r = c.post(app.url + "/login", data={"username": "vera",
                                             "password": PASSWORDS["vera"]})
        assert r.status_code == 403 and "contimg_session" not in c.cookies
        assert c.get(app.url + "/overview").status_code == 302


def test_sessions_and_tokens_are_revocable(app, data):
    db = StateDB(data["db_path"])
    acc = Accounts(db)
    acc.add("tmpuser", "viewer", "tmp-password-1")
    tok = acc.new_token("tmpuser")
    with httpx.Client() as c:
        assert _login(c, app.url, "tmpuser", "tmp-password-1").status_code == 302
        assert c.get(app.url + "/api/status").status_code == 200
        acc.set_password("tmpuser", "tmp-password-2")      # ends the session
        assert c.get(app.url + "/api/status").status_code == 401
    h = {"Authorization": f"Bearer {tok}"}
    assert _C.get(app.url + "/api/status", headers=h).status_code == 200
    assert acc.revoke("tmpuser") == 1
    assert _C.get(app.url + "/api/status", headers=h).status_code == 401
    tok2 = acc.new_token("tmpuser")
    acc.remove("tmpuser")
    assert _C.get(app.url + "/api/status",
                     headers={"Authorization": f"Bearer {tok2}"}).status_code == 401
    row = db.query("SELECT COUNT(*) AS n FROM api_tokens t WHERE t.user_name='tmpuser'")
    assert row[0]["n"] == 0
    # only a hash of a token is stored
    assert not db.query("SELECT 1 FROM api_tokens WHERE token_hash LIKE 'ctk_%'")


def test_failed_logins_are_slowed_down(app, data):
    with httpx.Client() as c:
        for _ in range(3):
            assert _login(c, app.url, "ada", "nope").status_code == 401
        r = _login(c, app.url, "ada", PASSWORDS["ada"])    # right password, too soon
        assert r.status_code == 429 and "too many failed logins" in r.text
        wait = int(r.headers["retry-after"])
        assert 1 <= wait <= 4
        time.sleep(wait)
        assert _login(c, app.url, "ada", PASSWORDS["ada"]).status_code == 302
        # unknown names are throttled the same way (no hint which names exist)
        for _ in range(3):
            assert _login(c, app.url, "nobody", "nope").status_code == 401
        assert _login(c, app.url, "nobody", "nope").status_code == 429


def test_path_traversal_is_refused(app, data):
    secret = data["secret"].read_bytes()
    attempts = [f"/api/images/{data['bad_image']}/fits",                   # absolute, outside
                f"/api/images/{data['bad_image']}/fits?product=residual",  # products/../..
                f"/api/images/{data['link_image']}/fits",                  # symlink out
                "/api/images/1/fits?product=..%2F..%2F..%2Fetc%2Fpasswd",
                "/api/images/1/fits?product=%2Fetc%2Fpasswd",
                "/api/images/..%2F..%2Fetc%2Fpasswd/fits",
                "/api/images/%2Fetc%2Fpasswd/fits",
                "/api/images/1%2F..%2F..%2Foutside%2Fsecret.fits/fits",
                "/api/groups/..%2F..%2F..%2Fetc%2Fpasswd",
                "/api/groups/%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
                "/api/sources/..%2F1/lightcurve"]
    before = _db_fingerprint(data["db_path"])
    for path in attempts:
        r = _C.get(app.url + path, headers=_h(data, "ada"))
        assert r.status_code in (400, 403, 404), (path, r.status_code)
        assert secret[:2880] not in r.content and b"root:" not in r.content
        _no_fallback_html(r)
    r = _C.get(app.url + f"/api/images/{data['bad_image']}/fits", headers=_h(data, "ada"))
    assert r.status_code == 403 and "products directory" in r.json()["error"]
    # un-normalised paths sent raw (httpx would resolve the dots itself)
    import socket

    for raw in ("/api/images/1/../../../../etc/passwd", "/api/../../etc/passwd",
                "/api/images/1/fits/../../../outside/secret.fits"):
        with socket.create_connection(("127.0.0.1", app.port)) as s:
            s.sendall(f"GET {raw} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                      f"{data['tokens']['ada']}\r\nConnection: close\r\n\r\n".encode())
            resp = b""
            while chunk := s.recv(65536):
                resp += chunk
        assert resp.split(b" ")[1] in (b"400", b"403", b"404"), (raw, resp[:80])
        assert b"root:" not in resp and secret[:2880] not in resp
    assert _db_fingerprint(data["db_path"]) == before


def test_sql_injection_in_every_parameter_changes_nothing(app, data):
    before = _db_fingerprint(data["db_path"])
    n_groups = len(data["groups"])
    for inj in INJECTIONS:
        qv = urllib.parse.quote(inj, safe="")
        for query in ("state", "since", "limit"):
            r = _get(app, data, f"/api/groups?{query}={qv}", "ada")
            assert r.status_code == 400, (query, inj)
        for query in ("stage", "status", "limit"):
            assert _get(app, data, f"/api/ms_index?{query}={qv}", "ada").status_code == 400
        for query in ("since", "limit"):
            assert _get(app, data, f"/api/images?{query}={qv}", "ada").status_code == 400
        assert _get(app, data, f"/api/sources?limit={qv}", "ada").status_code == 400
        assert _get(app, data, f"/api/ese/candidates?limit={qv}", "ada").status_code == 400
        for path in (f"/api/groups/{qv}", f"/api/images/{qv}", f"/api/images/{qv}/fits",
                     f"/api/images/{qv}/thumbnail", f"/api/sources/{qv}/lightcurve",
                     f"/api/images/1/fits?product={qv}"):
            r = _get(app, data, path, "ada")
            assert r.status_code in (400, 404), (path, r.status_code)
        r = _C.post(f"{app.url}/api/reprocess/{qv}", headers=_h(data, "ada"))
        assert r.status_code == 404, inj
        # injection in the login form: refused, and nobody is logged in
        if inj in INJECTIONS[:3]:     # (each costs an argon2 hash)
            with httpx.Client() as c:
                r = _login(c, app.url, inj, inj)
                assert r.status_code in (401, 429) and "contimg_session" not in c.cookies
        assert len(_get(app, data, "/api/groups", "ada").json()["groups"]) == n_groups
    after = _db_fingerprint(data["db_path"])
    after.pop("login_failures"), before.pop("login_failures")
    assert after == before


# ------------------------------------------------------------------ without a server
def test_requeue_is_what_backfill_and_reprocess_share(tmp_path):
    db = StateDB(tmp_path / "s.sqlite3")
    db.add_file("/x/a_sb00.hdf5", subband=0, timestamp=1.0, group_id="g", t_start=1.0,
                n_expected=1)
    db.transition("g", "pending")
    assert db.requeue("g", reason="r") is False          # pending: nothing to do
    db.claim("g")
    assert db.requeue("g", reason="r") is False and db.group("g")["state"] == "in_progress"
    db.transition("g", "failed", reason="boom", retries=3)
    assert db.requeue("g", reason="backfill --group") is True
    g = db.group("g")
    assert g["state"] == "pending" and g["retries"] == 0 and g["attempts"] == 1
    with pytest.raises(StateError, match="not in the state database"):
        db.requeue("nope", reason="r")


def test_thumbnail_and_qa_made_at_registration(tmp_path):
    from PIL import Image

    from app_data import _fits
    from contimg.pipeline import register_image_result

    rng = np.random.default_rng(1)
    p = _fits(tmp_path / "images" / "g-image.fits", rng, sources=[(150.2, 54.6, 5.0)])
    db = StateDB(tmp_path / "s.sqlite3")
    main = register_image_result(db, {"paths": {"image": str(p)}, "noise": 0.002, "peak": 5.0,
                                      "n_components": 12, "n_major": 2})
    qa = db.query("SELECT qa FROM images WHERE path=?", (main,))[0]["qa"]
    assert qa["n_components"] == 12 and qa["dynamic_range"] == pytest.approx(2500)
    png = Image.open(qa["thumbnail"])
    assert png.size == (128, 128) and png.mode == "L"
    # the source is the brightest spot, north up (FITS row 0 is the bottom)
    from astropy.io import fits
    from astropy.wcs import WCS

    px, py = WCS(fits.getheader(p)).celestial.world_to_pixel_values(150.2, 54.6)
    a = np.asarray(png)
    iy, ix = np.argwhere(a == a.max()).mean(axis=0)     # the saturated core's centre
    assert abs(ix - px) <= 1 and abs((127 - iy) - py) <= 1


def test_users_cli(tmp_path, monkeypatch, capsys):
    from contimg.cli import main

    dbp = str(tmp_path / "s.sqlite3")
    monkeypatch.setattr("sys.stdin", io.StringIO("a-long-password\n"))
    assert main(["users", "add", "carol", "--role", "operator", "--db", dbp]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["users", "add", "dave", "--role", "viewer", "--db", dbp]) == 2
    assert "too short" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["users", "add", "eve", "--role", "root", "--db", dbp])
    assert "invalid choice" in capsys.readouterr().err
    assert main(["users", "token", "carol", "--db", dbp]) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    acc = Accounts(StateDB(dbp))
    assert acc.token_user(token).name == "carol"
    assert acc.authenticate("carol", "a-long-password").role == "operator"
    assert acc.authenticate("carol", "wrong") is None
    assert main(["users", "list", "--db", dbp]) == 0
    assert "carol" in capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO("another-password\n"))
    assert main(["users", "passwd", "carol", "--db", dbp]) == 0
    assert acc.authenticate("carol", "another-password") is not None
    assert main(["users", "revoke", "carol", "--db", dbp]) == 0
    assert acc.token_user(token) is None
    assert main(["users", "remove", "carol", "--db", dbp]) == 0
    assert main(["users", "remove", "carol", "--db", dbp]) == 2
    # the stored hash is argon2id, never the password
    assert not StateDB(dbp).query("SELECT 1 FROM users")
    h = Accounts(StateDB(dbp))
    h.add("frank", "viewer", "frank-password")
    stored = StateDB(dbp).query("SELECT password_hash FROM users")[0]["password_hash"]
    assert stored.startswith("$argon2id$") and "frank-password" not in stored


def test_demo_app_makes_a_demo_operator_and_serves_the_demo(tmp_path, monkeypatch, capsys):
    import argparse

    from contimg.app import cli as appcli
    from contimg.cli import build_parser

    from contimg.config import load_config

    assert build_parser().parse_args(["demo", "--small", "--app"]).app
    served = {}
    monkeypatch.setattr(appcli, "_serve", lambda ctx, cfg: served.update(
        ctx=ctx, port=cfg.app.port, address=cfg.app.address))
    cfg = load_config(env={}, overrides={"app.port": 5123})

    def demo(args):   # stands for the demo: it leaves a state database under --out
        StateDB(Path(args.out) / "state" / "pipeline.sqlite3").close()
        return 0

    assert appcli._demo_with_app(demo)(argparse.Namespace(app=True, out=str(tmp_path),
                                                          cfg=cfg)) == 0
    out = capsys.readouterr().out
    password = re.search(r"password (\S+)", out).group(1)
    assert "http://127.0.0.1:5123/" in out and served["port"] == 5123
    assert served["ctx"].products == tmp_path / "products"
    acc = Accounts(served["ctx"].db)
    assert acc.authenticate("demo-operator", password).role == "operator"
    # a second run gets a new random password; the old one stops working
    appcli._demo_with_app(demo)(argparse.Namespace(app=True, out=str(tmp_path),
                                                   cfg=load_config(env={})))
    password2 = re.search(r"password (\S+)", capsys.readouterr().out).group(1)
    assert password2 != password and acc.authenticate("demo-operator", password) is None
