"""Accounts of the operator app: users with roles, API tokens, login throttling.

Everything lives in the state database (tables ``users``, ``api_tokens``,
``login_failures``; see :mod:`contimg.state`).

* Roles, in increasing power: ``viewer`` (read everything), ``operator`` (+ reprocess
  groups), ``admin`` (+ everything an operator does; accounts are managed with the CLI).
* Passwords are hashed with argon2id (``argon2-cffi``'s defaults); there is no default
  password and no account until someone makes one (``contimg users add``).
* API tokens are 256-bit random strings shown once; only their SHA-256 is stored (a
  slow hash buys nothing for a random 256-bit secret and would cost every request).
  A token can be revoked; removing a user removes its tokens.
* Repeated failed logins are slowed down: after ``max_failures`` consecutive failures
  for a name (known or not, so the answer does not tell which names exist), each
  further attempt must wait ``backoff_s * 2**(failures - max_failures)`` seconds (at
  most 5 minutes) after the last failure; earlier attempts are refused unchecked.
* Browser sessions: :func:`session_value` / :func:`session_user` make and check the
  signed cookie payload; it carries the user's ``session_epoch``, bumped whenever the
  password changes or the user is removed, which ends every session of that user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass

from contimg.state import StateDB

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin")
TOKEN_PREFIX = "ctk_"
SESSION_MAX_AGE_S = 12 * 3600
MAX_BACKOFF_S = 300.0


class AccountError(ValueError):
    """Bad account input: unknown user, bad role or name, empty password."""


class LoginThrottled(Exception):
    """Too many failed logins for this name: retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"too many failed logins; try again in {retry_after:.0f} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    name: str
    role: str

    def can(self, role: str) -> bool:
        """True when this user's role is ``role`` or above."""
        return ROLES.index(self.role) >= ROLES.index(role)


def _hasher():
    from argon2 import PasswordHasher

    return PasswordHasher()


def _check_name(name: str) -> str:
    if not name or len(name) > 64 or not all(c.isalnum() or c in "._-@" for c in name):
        raise AccountError(f"user name {name!r}: use 1-64 letters, digits, '.', '_', '-', '@'")
    return name


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise AccountError(f"role {role!r}: one of {', '.join(ROLES)}")
    return role


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    """Users, tokens and login throttling on a :class:`~contimg.state.StateDB`."""

    def __init__(self, db: StateDB, *, max_failures: int = 5, backoff_s: float = 1.0):
        self.db = db
        self.max_failures = int(max_failures)
        self.backoff_s = float(backoff_s)

    # ------------------------------------------------------------------ users
    def add(self, name: str, role: str, password: str | None) -> User:
        """A new user; ``password=None`` makes an account without password login
        (OAuth or API tokens only)."""
        _check_name(name)
        _check_role(role)
        h = None if password is None else self._hash(password)
        now = time.time()
        with self.db.transaction() as con:
            if con.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise AccountError(f"user {name!r} exists (contimg users passwd to change "
                                   "the password)")
            con.execute("INSERT INTO users (name, role, password_hash, created_at, "
                        "updated_at) VALUES (?,?,?,?,?)", (name, role, h, now, now))
        log.info("user %s added (%s)", name, role)
        return User(name, role)

    def _hash(self, password: str) -> str:
        if not password:
            raise AccountError("empty password")
        return _hasher().hash(password)

    def get(self, name: str) -> User | None:
        r = self.db.query("SELECT name, role FROM users WHERE name=?", (name,))
        return User(r[0]["name"], r[0]["role"]) if r else None

    def list(self) -> list[dict]:
        return self.db.query(
            "SELECT u.name, u.role, u.password_hash IS NOT NULL AS has_password, "
            "u.created_at, (SELECT COUNT(*) FROM api_tokens t WHERE t.user_name = u.name "
            "AND t.revoked_at IS NULL) AS tokens FROM users u ORDER BY u.name")

    def remove(self, name: str):
        with self.db.transaction() as con:
            if con.execute("DELETE FROM users WHERE name=?", (name,)).rowcount != 1:
                raise AccountError(f"no user {name!r}")
        log.info("user %s removed", name)

    def set_password(self, name: str, password: str):
        """New password; every browser session of the user ends."""
        h = self._hash(password)
        with self.db.transaction() as con:
            n = con.execute("UPDATE users SET password_hash=?, session_epoch=session_epoch+1,"
                            " updated_at=? WHERE name=?", (h, time.time(), name)).rowcount
            if n != 1:
                raise AccountError(f"no user {name!r}")

    def set_role(self, name: str, role: str):
        _check_role(role)
        with self.db.transaction() as con:
            if con.execute("UPDATE users SET role=?, updated_at=? WHERE name=?",
                           (role, time.time(), name)).rowcount != 1:
                raise AccountError(f"no user {name!r}")

    # ------------------------------------------------------------------ passwords
    def authenticate(self, name: str, password: str) -> User | None:
        """The user when the password is right, None otherwise (failure counted);
        LoginThrottled when this name has failed too often too recently."""
        now = time.time()
        f = self.db.query("SELECT failures, last_at FROM login_failures WHERE user_name=?",
                          (name,))
        if f and f[0]["failures"] >= self.max_failures:
            wait = min(MAX_BACKOFF_S,
                       self.backoff_s * 2.0 ** (f[0]["failures"] - self.max_failures))
            if now < f[0]["last_at"] + wait:
                raise LoginThrottled(f[0]["last_at"] + wait - now)
        r = self.db.query("SELECT name, role, password_hash FROM users WHERE name=?", (name,))
        ok = False
        if r and r[0]["password_hash"]:
            from argon2.exceptions import InvalidHashError, VerificationError

            try:
                ok = _hasher().verify(r[0]["password_hash"], password)
            except (VerificationError, InvalidHashError):
                ok = False
        else:
            # the same work for unknown names, so timing does not tell them apart
            _hasher().hash(password or "-")
        with self.db.transaction() as con:
            if ok:
                con.execute("DELETE FROM login_failures WHERE user_name=?", (name,))
            else:   # the wait counts from the answer, not from the request
                con.execute("INSERT INTO login_failures (user_name, failures, last_at) "
                            "VALUES (?,1,?) ON CONFLICT(user_name) DO UPDATE SET "
                            "failures=failures+1, last_at=excluded.last_at",
                            (name, time.time()))
        if not ok:
            log.warning("failed login for %r", name)
            return None
        return User(r[0]["name"], r[0]["role"])

    # ------------------------------------------------------------------ sessions
    def session_value(self, user: User) -> str:
        """The payload of a browser session cookie (the server signs it)."""
        epoch = self.db.query("SELECT session_epoch FROM users WHERE name=?",
                              (user.name,))[0]["session_epoch"]
        return json.dumps({"u": user.name, "e": epoch, "t": time.time()})

    def session_user(self, value: str | bytes | None) -> User | None:
        """The user of a (signature-checked) session payload, None if it is
        malformed, expired, or the user's sessions were ended since."""
        if not value:
            return None
        try:
            d = json.loads(value)
            name, epoch, t = str(d["u"]), int(d["e"]), float(d["t"])
        except (ValueError, KeyError, TypeError):
            return None
        if time.time() - t > SESSION_MAX_AGE_S:
            return None
        r = self.db.query("SELECT name, role, session_epoch FROM users WHERE name=?", (name,))
        if not r or r[0]["session_epoch"] != epoch:
            return None
        return User(r[0]["name"], r[0]["role"])

    # ------------------------------------------------------------------ tokens
    def new_token(self, name: str, label: str | None = None) -> str:
        """A new API token for ``name`` (returned once; stored hashed)."""
        if self.get(name) is None:
            raise AccountError(f"no user {name!r}")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self.db.transaction() as con:
            con.execute("INSERT INTO api_tokens (user_name, token_hash, label, created_at) "
                        "VALUES (?,?,?,?)", (name, _token_hash(token), label, time.time()))
        return token

    def token_user(self, token: str) -> User | None:
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            return None
        r = self.db.query("SELECT t.id, u.name, u.role FROM api_tokens t JOIN users u ON "
                          "u.name = t.user_name WHERE t.token_hash=? AND t.revoked_at IS NULL",
                          (_token_hash(token),))
        if not r:
            return None
        return User(r[0]["name"], r[0]["role"])

    def tokens(self, name: str) -> list[dict]:
        return self.db.query("SELECT id, label, created_at, revoked_at FROM api_tokens "
                             "WHERE user_name=? ORDER BY id", (name,))

    def revoke(self, name: str, token_id: int | None = None) -> int:
        """Revoke one token of ``name`` (by id) or all of them; returns how many."""
        sql, args = ("UPDATE api_tokens SET revoked_at=? WHERE user_name=? AND "
                     "revoked_at IS NULL", [time.time(), name])
        if token_id is not None:
            sql += " AND id=?"
            args.append(int(token_id))
        with self.db.transaction() as con:
            return con.execute(sql, args).rowcount
