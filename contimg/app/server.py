"""One Tornado server for the operator app: Panel pages, the REST API, login.

:func:`make_server` builds it (Panel's ``get_server`` with the API as
``extra_patterns`` and our accounts as Bokeh's auth provider); :func:`serve` runs it
until interrupted. Browser sessions are Tornado-signed HttpOnly cookies
(``contimg_session``, SameSite=Lax, 12 h); the login form and every cookie-authenticated
POST carry Tornado's XSRF token; Bokeh session ids are signed with the same secret so
a page's websocket can only be opened from a page the server rendered for a logged-in
user, and websocket origins are checked (Bokeh's ``allow_websocket_origin``).

With ``oauth_provider`` set (e.g. ``github``), Panel's own OAuth login replaces the
password form for pages; the OAuth user name must exist in the users table (its role
applies; ``contimg users add NAME --role viewer --no-password``). API tokens work the
same either way.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import tornado.web

from contimg.app import api
from contimg.app.accounts import Accounts, LoginThrottled, User
from contimg.state import StateDB

log = logging.getLogger(__name__)

PAGES = ("overview", "groups", "calibration", "images", "sources", "cluster")


@dataclass
class AppContext:
    """What every handler and page shares."""

    db: StateDB
    products: Path | None
    cookie_secret: str
    scheduler: str = ""
    dashboard_url: str = ""
    task_log: str = ""            # [dask] task_log: the workers' task records
    oauth_provider: str = ""
    max_failures: int = 5
    backoff_s: float = 1.0
    cache_s: float = 1.0          # how long a list/status response is shared
    accounts: Accounts = field(init=False)
    cache: dict = field(init=False, default_factory=dict)

    def __post_init__(self):
        self.accounts = Accounts(self.db, max_failures=self.max_failures,
                                 backoff_s=self.backoff_s)

    def cookie_user(self, handler) -> User | None:
        """The user of a request's session cookie (or Panel's OAuth cookie)."""
        if self.oauth_provider:
            name = handler.get_signed_cookie("user")
            return self.accounts.get(name.decode()) if name else None
        value = handler.get_signed_cookie(api.SESSION_COOKIE, max_age_days=1)
        return self.accounts.session_user(value)

    def user_from_cookies(self, cookies: dict) -> User | None:
        """The same from a Bokeh session's cookies (a page's server side)."""
        from tornado.web import decode_signed_value

        name, days = ("user", 31) if self.oauth_provider else (api.SESSION_COOKIE, 1)
        raw = cookies.get(name)
        if not raw:
            return None
        value = decode_signed_value(self.cookie_secret, name, raw, max_age_days=days)
        if value is None:
            return None
        if self.oauth_provider:
            return self.accounts.get(value.decode())
        return self.accounts.session_user(value)


_LOGIN_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>contimg: log in</title>
<style>body{{font-family:sans-serif;background:#f4f6f8}}form{{width:320px;margin:12vh auto;
background:#fff;padding:24px 28px;border-radius:8px;box-shadow:0 1px 4px #0002}}
input{{width:100%;padding:8px;margin:6px 0 14px;box-sizing:border-box}}
button{{padding:8px 18px}}.err{{color:#b00020;margin-bottom:10px}}</style></head><body>
<form method="post" action="/login"><h2>contimg operator app</h2>{message}
{xsrf}<input type="hidden" name="next" value="{next}">
<label>User<input name="username" id="username" autocomplete="username" autofocus></label>
<label>Password<input name="password" id="password" type="password"
 autocomplete="current-password"></label><button type="submit" id="login">Log in</button>
</form></body></html>"""


def _safe_next(value: str | None) -> str:
    """Only a local path: never another host (open redirect)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/overview"
    return value


class LoginHandler(tornado.web.RequestHandler):
    ctx: AppContext   # set by make_server (Bokeh instantiates the class without kwargs)

    def _page(self, status=200, message=""):
        self.set_status(status)
        self.set_header("Cache-Control", "no-store")
        msg = f'<div class="err" id="message">{html.escape(message)}</div>' if message else ""
        self.finish(_LOGIN_HTML.format(message=msg, xsrf=self.xsrf_form_html(),
                                       next=html.escape(_safe_next(self.get_argument(
                                           "next", None)))))

    def get(self):
        self._page()

    async def post(self):
        self.check_xsrf_cookie()
        name = self.get_body_argument("username", "")[:200]
        password = self.get_body_argument("password", "")[:1000]
        try:
            user = await asyncio.get_running_loop().run_in_executor(
                None, self.ctx.accounts.authenticate, name, password)
        except LoginThrottled as exc:
            self.set_header("Retry-After", str(int(exc.retry_after) + 1))
            return self._page(429, str(exc))
        if user is None:
            return self._page(401, "Wrong user name or password.")
        self.set_signed_cookie(api.SESSION_COOKIE, self.ctx.accounts.session_value(user),
                               expires_days=0.5, httponly=True, samesite="Lax",
                               secure=self.request.protocol == "https")
        log.info("user %s logged in from %s", user.name, self.request.remote_ip)
        self.redirect(_safe_next(self.get_body_argument("next", None)))


class LogoutHandler(tornado.web.RequestHandler):
    def get(self):
        self.clear_cookie(api.SESSION_COOKIE)
        self.redirect("/login")


class RootHandler(tornado.web.RequestHandler):
    def get(self):
        self.redirect("/overview")


def _auth_provider(ctx: AppContext):
    from bokeh.server.auth_provider import AuthProvider

    handler = type("ContimgLogin", (LoginHandler,), {"ctx": ctx})

    class ContimgAuth(AuthProvider):
        @property
        def get_user(self):
            return lambda h: (lambda u: u.name if u else None)(ctx.cookie_user(h))

        @property
        def login_url(self):
            return "/login"

        @property
        def login_handler(self):
            return handler

        @property
        def logout_url(self):
            return "/logout"

        @property
        def logout_handler(self):
            return LogoutHandler

    return ContimgAuth()


def cookie_secret_for(configured: str, db: StateDB) -> str:
    """The configured secret, else one kept beside the state database (mode 0600), so
    sessions survive a restart without anyone having to invent a secret."""
    if configured:
        return configured
    path = Path(str(db.path) + ".app-secret")
    if not path.exists():
        tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48))
        os.replace(tmp, path)
    return path.read_text().strip()


def make_server(ctx: AppContext, *, port: int = 5006, address: str = "127.0.0.1",
                oauth_key: str = "", oauth_secret: str = "", websocket_origin=None):
    """The Bokeh/Panel server with the pages, the API and login (not started)."""
    import panel as pn

    from contimg.app import pages

    apps = {name: (lambda n=name: pages.build(n, ctx)) for name in PAGES}
    extra = [(r"/$", RootHandler)] + api.patterns(ctx)
    if not websocket_origin:   # the page's websocket only from pages served by this host
        import socket

        hosts = {address, "localhost", "127.0.0.1"}
        if address in ("0.0.0.0", "::", ""):
            hosts |= {socket.gethostname(), socket.getfqdn()}
        websocket_origin = sorted(f"{h}:{port}" for h in hosts if h)
    kw = dict(port=port, address=address, show=False, start=False, title="contimg",
              extra_patterns=extra, cookie_secret=ctx.cookie_secret, xsrf_cookies=True,
              sign_sessions=True, secret_key=ctx.cookie_secret,
              websocket_origin=websocket_origin)
    if ctx.oauth_provider:
        kw.update(oauth_provider=ctx.oauth_provider, oauth_key=oauth_key,
                  oauth_secret=oauth_secret)
    else:
        kw["auth_provider"] = _auth_provider(ctx)
    return pn.serve(apps, **kw)


def serve(ctx: AppContext, *, port: int = 5006, address: str = "127.0.0.1", **kw):
    """Run the app until Ctrl-C."""
    server = make_server(ctx, port=port, address=address, **kw)
    server.start()
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
