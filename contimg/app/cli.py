"""``contimg app``, ``contimg users ...`` and ``contimg demo --app``."""

from __future__ import annotations

import argparse
import getpass
import secrets
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from contimg.app.accounts import ROLES, AccountError, Accounts

# the configuration's [app] section (contimg.config, once there); these are its defaults
_APP_DEFAULTS = dict(address="127.0.0.1", port=5006, scheduler="", dashboard_url="",
                     cookie_secret="", oauth_provider="", oauth_key="", oauth_secret="",
                     login_max_failures=5, login_backoff_s=1.0)


def app_config():
    """``cfg.app`` of the configuration when :mod:`contimg.config` exists, else the same
    fields at their defaults."""
    try:
        from contimg.config import load_config
    except ImportError:
        return SimpleNamespace(**_APP_DEFAULTS)
    return load_config().app


def _db(args):
    from contimg.state import StateDB

    return StateDB(args.db)


def _read_password(prompt="password") -> str:
    """Twice from the terminal, or one line from stdin when it is not a terminal."""
    if not sys.stdin.isatty():
        pw = sys.stdin.readline().rstrip("\r\n")
    else:
        pw = getpass.getpass(f"{prompt}: ")
        if getpass.getpass(f"{prompt} again: ") != pw:
            raise AccountError("the two passwords differ")
    if len(pw) < 8:
        raise AccountError("password too short (8 characters at least)")
    return pw


def cmd_users(args):
    acc = Accounts(_db(args))
    if args.users_cmd == "add":
        pw = None if args.no_password else _read_password()
        acc.add(args.name, args.role, pw)
        print(f"user {args.name} added ({args.role})")
    elif args.users_cmd == "remove":
        acc.remove(args.name)
        print(f"user {args.name} removed (and its tokens)")
    elif args.users_cmd == "passwd":
        acc.set_password(args.name, _read_password("new password"))
        print(f"password of {args.name} changed; its browser sessions ended")
    elif args.users_cmd == "role":
        acc.set_role(args.name, args.role)
        print(f"user {args.name} is now {args.role}")
    elif args.users_cmd == "list":
        rows = acc.list()
        print(f"{'user':<24} {'role':<9} {'password':<8} tokens")
        for r in rows:
            print(f"{r['name']:<24} {r['role']:<9} {'yes' if r['has_password'] else 'no':<8} "
                  f"{r['tokens']}")
    elif args.users_cmd == "token":
        token = acc.new_token(args.name, args.label)
        print(f"new API token for {args.name} (shown once; send it as "
              "'Authorization: Bearer TOKEN'):")
        print(token)
    elif args.users_cmd == "revoke":
        n = acc.revoke(args.name, args.id)
        print(f"{n} token(s) of {args.name} revoked")
    return 0


def _context(db_path, products, scheduler, cfg):
    from contimg.app.server import AppContext, cookie_secret_for
    from contimg.state import StateDB

    db = StateDB(db_path)
    return AppContext(db=db, products=Path(products) if products else None,
                      cookie_secret=cookie_secret_for(cfg.cookie_secret, db),
                      scheduler=scheduler or "", dashboard_url=cfg.dashboard_url,
                      oauth_provider=cfg.oauth_provider,
                      max_failures=cfg.login_max_failures, backoff_s=cfg.login_backoff_s)


def _serve(ctx, cfg, port, address):
    from contimg.app.server import serve

    print(f"contimg app: http://{address}:{port}/  (state {ctx.db.path}, products "
          f"{ctx.products or 'not set: downloads off'}; Ctrl-C stops)", flush=True)
    serve(ctx, port=port, address=address, oauth_key=cfg.oauth_key,
          oauth_secret=cfg.oauth_secret)


def cmd_app(args):
    cfg = app_config()
    ctx = _context(args.db, args.products, args.scheduler or cfg.scheduler, cfg)
    if not ctx.accounts.list() and not cfg.oauth_provider:
        print("no accounts yet: make one with 'contimg users add NAME --role admin'",
              file=sys.stderr)
    _serve(ctx, cfg, args.port or cfg.port, args.address or cfg.address)
    return 0


def _demo_with_app(run_demo):
    """``contimg demo --app``: the demo, then a demo operator with a random password,
    then the app on the demo's products until Ctrl-C."""

    def cmd(args):
        if not args.app:
            return run_demo(args)
        args.out = args.out or tempfile.mkdtemp(prefix="contimg-demo-")
        rc = run_demo(args)
        out = Path(args.out)
        cfg = app_config()
        ctx = _context(out / "state" / "pipeline.sqlite3", out / "products", None, cfg)
        password = secrets.token_urlsafe(12)
        name = "demo-operator"
        if ctx.accounts.get(name) is not None:
            ctx.accounts.set_password(name, password)
        else:
            ctx.accounts.add(name, "operator", password)
        port, address = args.app_port or cfg.port, cfg.address
        print(f"\noperator app: http://{address}:{port}/\n  user {name}\n  password "
              f"{password}\n(demo exit status {rc}; Ctrl-C stops the app)", flush=True)
        _serve(ctx, cfg, port, address)
        return rc

    return cmd


def add_subcommands(sub):
    """Register ``app`` and ``users`` (and ``--app`` on ``demo`` when it exists)."""
    db_help = "state database (default $PIPELINE_DB or state/db/pipeline.sqlite3)"
    s = sub.add_parser("app", help="the operator app: Panel pages and the REST API")
    s.add_argument("--db", default=None, help=db_help)
    s.add_argument("--products", default=None,
                   help="products directory (the stream's --output): files served from it")
    s.add_argument("--scheduler", default=None, help="the stream's Dask scheduler address")
    s.add_argument("--port", type=int, default=None, help="port (default 5006)")
    s.add_argument("--address", default=None, help="address to listen on (default 127.0.0.1)")
    s.set_defaults(func=cmd_app)

    u = sub.add_parser("users", help="accounts of the operator app")
    us = u.add_subparsers(dest="users_cmd", required=True)
    p = us.add_parser("add", help="add a user (password from the terminal, twice, or stdin)")
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--no-password", action="store_true",
                   help="no password login (OAuth or API tokens only)")
    for name, hlp in (("remove", "remove a user and its tokens"),
                      ("passwd", "change a password (ends the user's sessions)"),
                      ("token", "make an API token (printed on the last line)"),
                      ("revoke", "revoke API tokens")):
        p = us.add_parser(name, help=hlp)
        p.add_argument("name")
        if name == "token":
            p.add_argument("--label", default=None, help="what the token is for")
        if name == "revoke":
            p.add_argument("--id", type=int, default=None, help="one token (default: all)")
    p = us.add_parser("role", help="change a user's role")
    p.add_argument("name")
    p.add_argument("role", choices=ROLES)
    us.add_parser("list", help="list users")
    for p in [u] + list(us.choices.values()):
        p.add_argument("--db", default=argparse.SUPPRESS if p is not u else None, help=db_help)
    u.set_defaults(func=cmd_users)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--app", action="store_true",
                          help="then serve the operator app on the demo's products")
        demo.add_argument("--app-port", type=int, default=None, help="the app's port")
        demo.set_defaults(func=_demo_with_app(demo.get_default("func")))
