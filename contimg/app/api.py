"""The REST API: Tornado handlers served beside the Panel pages (one server).

JSON in and out; every error is ``{"error": message, "status": code}``. Every endpoint
but ``/api/health`` needs a user: ``Authorization: Bearer TOKEN`` (scripts) or the
browser's signed session cookie; a cookie-authenticated POST must also carry the
XSRF token (``X-XSRFToken`` header or ``_xsrf`` field, Tornado's double-submit check).
401 without a valid login, 403 below the role an endpoint needs (or a bad XSRF token),
404 for an unknown group/image/source, 400 for a malformed parameter, 409 when a group
cannot be reprocessed in its state. :data:`ROUTES` is both what is served and what
``/api/openapi.json`` documents.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import os
import time

import tornado.web

from contimg.app import queries as q
from contimg.app.accounts import ROLES
from contimg.app.products import Forbidden, safe_product_path
from contimg.state import StateError

log = logging.getLogger(__name__)

SESSION_COOKIE = "contimg_session"
CHUNK = 1 << 20
IMAGE_PRODUCTS = ("image", "image-pb", "residual", "model", "psf")


class ApiError(tornado.web.HTTPError):
    def __init__(self, status: int, message: str):
        super().__init__(status, log_message=message.replace("%", "%%"))
        self.message = message


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, bytes):
        return o.decode(errors="replace")
    return str(o)


class ApiHandler(tornado.web.RequestHandler):
    """Base: authentication, role check, XSRF for cookie sessions, JSON errors."""

    role = "viewer"          # the least role that may call it (None: no login)

    def initialize(self, ctx):
        self.ctx = ctx
        self._via = None

    def get_current_user(self):
        auth = self.request.headers.get("Authorization")
        if auth is not None:
            self._via = "token"
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer":
                return None
            return self.ctx.accounts.token_user(token.strip())
        if self.get_cookie(SESSION_COOKIE):
            self._via = "cookie"
            return self.ctx.cookie_user(self)
        return None

    def check_xsrf_cookie(self):
        """Checked in :meth:`prepare`, and only for cookie sessions: a bearer token is
        not an ambient credential a foreign page could make the browser send."""

    def _timing(self):
        """``Server-Timing: app;dur=MS``: the time spent here, for benches and browsers."""
        t0 = getattr(self, "_t0", None)
        if t0 is not None:
            self.set_header("Server-Timing",
                            f"app;dur={(time.perf_counter() - t0) * 1e3:.2f}")

    def prepare(self):
        self._t0 = time.perf_counter()
        if self.role is None:
            return
        user = self.current_user
        if user is None:
            self.set_header("WWW-Authenticate", 'Bearer realm="contimg"')
            raise ApiError(401, "login required: send 'Authorization: Bearer TOKEN' "
                                "(contimg users token NAME) or log in at /login")
        if self.request.method not in ("GET", "HEAD", "OPTIONS") and self._via == "cookie":
            try:
                tornado.web.RequestHandler.check_xsrf_cookie(self)
            except tornado.web.HTTPError:
                raise ApiError(403, "XSRF check failed: send the _xsrf cookie's value in "
                                    "the X-XSRFToken header") from None
        if not user.can(self.role):
            raise ApiError(403, f"user {user.name!r} ({user.role}) may not do this: it "
                                f"needs the {self.role} role")

    def write_json(self, obj, status: int = 200):
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        body = json.dumps(obj, default=_json_default)
        self._timing()
        self.finish(body)

    def write_error(self, status_code, **kw):
        exc = kw.get("exc_info", (None, None))[1]
        if isinstance(exc, ApiError):
            msg = exc.message
        elif isinstance(exc, tornado.web.HTTPError) and exc.log_message:
            msg = exc.log_message % exc.args if exc.args else exc.log_message
        else:
            msg = self._reason
        self.clear_header("Content-Disposition")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": msg, "status": status_code}))

    def write_cached(self, fn, *args, wrap=None):
        """The JSON of ``fn(db, *args)`` (wrapped in ``{wrap: ...}``), shared by every
        caller for ``ctx.cache_s`` seconds: polling clients cost one query per interval
        instead of one each. A reprocess clears it."""
        key = (fn.__name__, wrap, args)
        hit = self.ctx.cache.get(key)
        now = time.monotonic()
        if hit is None or hit[0] < now:
            out = self._call(fn, self.ctx.db, *args)
            hit = (now + self.ctx.cache_s, json.dumps({wrap: out} if wrap else out,
                                                      default=_json_default))
            if len(self.ctx.cache) > 1000:
                self.ctx.cache.clear()
            self.ctx.cache[key] = hit
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.set_header("Cache-Control", "no-store")
        self._timing()
        self.finish(hit[1])

    def _call(self, fn, *args, **kw):
        """A query, with its errors mapped to HTTP statuses."""
        try:
            return fn(*args, **kw)
        except q.BadParameter as exc:
            raise ApiError(400, str(exc)) from None
        except q.NotFound as exc:
            raise ApiError(404, str(exc)) from None

    def arg(self, name):
        return self.get_query_argument(name, None)


class HealthHandler(ApiHandler):
    role = None

    def get(self):
        self.write_json({"status": "ok", "schema_version": self.ctx.db.version})


class StatusHandler(ApiHandler):
    def get(self):
        self.write_cached(q.status, self.ctx.products)


class GroupsHandler(ApiHandler):
    def get(self):
        self.write_cached(q.groups, self.arg("state"), self.arg("since"), self.arg("limit"),
                          wrap="groups")


class GroupHandler(ApiHandler):
    def get(self, group_id):
        self.write_json(self._call(q.group, self.ctx.db, group_id))


class MsIndexHandler(ApiHandler):
    def get(self):
        self.write_cached(q.ms_index, self.arg("stage"), self.arg("status"),
                          self.arg("limit"), wrap="ms")


def reprocess(db, group_id: str, user) -> dict:
    """Reprocess a group as ``contimg backfill --group`` does (StateDB.requeue)."""
    try:
        changed = db.requeue(group_id, reason=f"reprocess by {user.name} (operator app)")
    except StateError:
        raise q.NotFound(f"group {group_id!r} is not in the state database") from None
    state = db.group(group_id)["state"]
    if not changed:
        raise ApiError(409, f"group {group_id} is {state}: only completed or failed groups "
                            "can be reprocessed")
    log.info("group %s: reprocess requested by %s", group_id, user.name)
    return {"group_id": group_id, "state": state}


class ReprocessHandler(ApiHandler):
    role = "operator"

    def post(self, group_id):
        out = self._call(reprocess, self.ctx.db, group_id, self.current_user)
        self.ctx.cache.clear()
        self.write_json(out)


class CalibrationSetsHandler(ApiHandler):
    def get(self):
        self.write_json({"calibration_sets": q.calibration_sets(self.ctx.db)})


class ImagesHandler(ApiHandler):
    def get(self):
        self.write_json({"images": self._call(q.images, self.ctx.db, self.arg("since"),
                                              self.arg("limit"))})


class ImageHandler(ApiHandler):
    def get(self, image_id):
        self.write_json(self._call(q.image, self.ctx.db, image_id))


class _FileHandler(ApiHandler):
    async def send_file(self, path, content_type, filename=None):
        try:
            p = safe_product_path(path, self.ctx.products)
        except Forbidden as exc:
            log.warning("refused to serve %s: %s", path, exc)
            raise ApiError(403, "this file is not a product under the products "
                                "directory") from None
        except FileNotFoundError:
            raise ApiError(404, "the product file is missing on disk") from None
        self.set_header("Content-Type", content_type)
        self.set_header("Content-Length", str(p.stat().st_size))
        if filename:
            self.set_header("Content-Disposition", f'attachment; filename="{filename}"')
        with open(p, "rb") as fh:
            while chunk := fh.read(CHUNK):
                self.write(chunk)
                await self.flush()
        self.finish()


class ImageFitsHandler(_FileHandler):
    async def get(self, image_id):
        im = self._call(q.image, self.ctx.db, image_id)
        product = self.arg("product") or "image"
        if product not in IMAGE_PRODUCTS:
            raise ApiError(400, f"parameter 'product': {product!r} is not one of "
                                f"{', '.join(IMAGE_PRODUCTS)}")
        path = im["path"] if product == "image" else (im["products"] or {}).get(product)
        if not path:
            raise ApiError(404, f"image {image_id} has no {product} product")
        await self.send_file(path, "application/fits", os.path.basename(path))


class ImageThumbnailHandler(_FileHandler):
    async def get(self, image_id):
        im = self._call(q.image, self.ctx.db, image_id)
        path = (im["qa"] or {}).get("thumbnail")
        if not path:
            raise ApiError(404, f"image {image_id} has no thumbnail")
        await self.send_file(path, mimetypes.types_map[".png"])


class SourcesHandler(ApiHandler):
    def get(self):
        self.write_json({"sources": self._call(q.sources, self.ctx.db, self.arg("limit")),
                         "inventory": q.science_inventory(self.ctx.db)})


class LightcurveHandler(ApiHandler):
    def get(self, source_id):
        self.write_json(self._call(q.lightcurve, self.ctx.db, source_id))


class EseCandidatesHandler(ApiHandler):
    def get(self):
        self.write_json(self._call(q.ese_candidates, self.ctx.db, self.arg("limit")))


class OpenApiHandler(ApiHandler):
    role = None

    def get(self):
        self.write_json(openapi())


_P = {"limit": ("integer", "at most this many rows (1..10000)"),
      "since": ("string", "unix seconds or ISO-8601 time (UTC)"),
      "state": ("string", "group state: " + ", ".join(("collecting", "pending", "in_progress",
                                                      "completed", "failed"))),
      "stage": ("string", "furthest stage of the MS: " + ", ".join(q.MS_STAGES)),
      "status": ("string", "state of the MS's group"),
      "product": ("string", "which FITS product: " + ", ".join(IMAGE_PRODUCTS))}

# (path template, handler, method, summary, query parameters, response type)
ROUTES = [
    ("/api/health", HealthHandler, "get", "liveness (no login)", (), "application/json"),
    ("/api/status", StatusHandler, "get", "queue, throughput, failures, disk", (),
     "application/json"),
    ("/api/groups", GroupsHandler, "get", "groups, newest first", ("state", "since", "limit"),
     "application/json"),
    ("/api/groups/{group_id}", GroupHandler, "get", "one group: events, timings, products",
     (), "application/json"),
    ("/api/ms_index", MsIndexHandler, "get", "Measurement Sets", ("stage", "status", "limit"),
     "application/json"),
    ("/api/reprocess/{group_id}", ReprocessHandler, "post",
     "put a completed or failed group back to pending (operator)", (), "application/json"),
    ("/api/calibration_sets", CalibrationSetsHandler, "get", "calibration sets", (),
     "application/json"),
    ("/api/images", ImagesHandler, "get", "images with QA, newest first", ("since", "limit"),
     "application/json"),
    ("/api/images/{id}", ImageHandler, "get", "one image", (), "application/json"),
    ("/api/images/{id}/fits", ImageFitsHandler, "get", "download a FITS product",
     ("product",), "application/fits"),
    ("/api/images/{id}/thumbnail", ImageThumbnailHandler, "get", "PNG thumbnail", (),
     "image/png"),
    ("/api/sources", SourcesHandler, "get", "sources and what science tables exist",
     ("limit",), "application/json"),
    ("/api/sources/{id}/lightcurve", LightcurveHandler, "get", "a source's photometry", (),
     "application/json"),
    ("/api/ese/candidates", EseCandidatesHandler, "get", "ESE candidates", ("limit",),
     "application/json"),
    ("/api/openapi.json", OpenApiHandler, "get", "this document (no login)", (),
     "application/json"),
]


def _tornado_pattern(template: str) -> str:
    import re

    return re.sub(r"\{[^}]+\}", "([^/]+)", template) + "$"


def patterns(ctx) -> list[tuple]:
    """The Tornado URL patterns of :data:`ROUTES` (for ``extra_patterns``)."""
    return [(_tornado_pattern(p), h, {"ctx": ctx}) for p, h, *_ in ROUTES]


def openapi() -> dict:
    import re

    paths: dict = {}
    for path, handler, method, summary, params, ctype in ROUTES:
        op = {"summary": summary, "parameters": [], "responses": {
            "200": {"description": "OK", "content": {ctype: {}}},
            "400": {"description": "bad parameter (JSON error)"},
            "404": {"description": "unknown object (JSON error)"}}}
        for name in re.findall(r"\{([^}]+)\}", path):
            op["parameters"].append({"name": name, "in": "path", "required": True,
                                     "schema": {"type": "string"}})
        for name in params:
            typ, desc = _P[name]
            op["parameters"].append({"name": name, "in": "query", "required": False,
                                     "description": desc, "schema": {"type": typ}})
        if handler.role is not None:
            op["security"] = [{"bearer": []}, {"cookie": []}]
            op["responses"]["401"] = {"description": "login required"}
            op["responses"]["403"] = {"description": f"needs the {handler.role} role"}
        paths.setdefault(path, {})[method] = op
    return {"openapi": "3.0.3",
            "info": {"title": "contimg operator API", "version": "1",
                     "description": "roles: " + ", ".join(ROLES)},
            "paths": paths,
            "components": {"securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "cookie": {"type": "apiKey", "in": "cookie", "name": SESSION_COOKIE}}}}
