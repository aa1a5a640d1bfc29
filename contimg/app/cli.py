"""``contimg app``, ``contimg users ...`` and ``contimg demo --app``."""

from __future__ import annotations

import getpass
import secrets
import sys
import tempfile
from pathlib import Path

from contimg.app.accounts import ROLES, AccountError, Accounts


def _db(args):
    from contimg.state import StateDB

    return StateDB(args.cfg.paths.db)


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
    if args.verb == "add":
        pw = None if args.no_password else _read_password()
        acc.add(args.name, args.role, pw)
        print(f"user {args.name} added ({args.role})")
    elif args.verb == "remove":
        acc.remove(args.name)
        print(f"user {args.name} removed (and its tokens)")
    elif args.verb == "passwd":
        acc.set_password(args.name, _read_password("new password"))
        print(f"password of {args.name} changed; its browser sessions ended")
    elif args.verb == "role":
        acc.set_role(args.name, args.role)
        print(f"user {args.name} is now {args.role}")
    elif args.verb == "list":
        rows = acc.list()
        print(f"{'user':<24} {'role':<9} {'password':<8} tokens")
        for r in rows:
            print(f"{r['name']:<24} {r['role']:<9} {'yes' if r['has_password'] else 'no':<8} "
                  f"{r['tokens']}")
    elif args.verb == "token":
        token = acc.new_token(args.name, args.label)
        print(f"new API token for {args.name} (shown once; send it as "
              "'Authorization: Bearer TOKEN'):")
        print(token)
    elif args.verb == "revoke":
        n = acc.revoke(args.name, args.id)
        print(f"{n} token(s) of {args.name} revoked")
    return 0


def _context(cfg, db_path, products):
    """The app's context from the configuration (``cfg``: the whole Config)."""
    from contimg.app.server import AppContext, cookie_secret_for
    from contimg.state import StateDB

    db = StateDB(db_path)
    a = cfg.app
    return AppContext(db=db, products=Path(products) if products else None,
                      cookie_secret=cookie_secret_for(a.cookie_secret, db),
                      scheduler=a.scheduler or cfg.dask.scheduler,
                      dashboard_url=a.dashboard_url, oauth_provider=a.oauth_provider,
                      task_log=str(cfg.dask.task_log or ""),
                      max_failures=a.login_max_failures, backoff_s=a.login_backoff_s)


def _serve(ctx, cfg):
    from contimg.app.server import serve

    a = cfg.app
    print(f"contimg app: http://{a.address}:{a.port}/  (state {ctx.db.path}, products "
          f"{ctx.products or 'not set: downloads off'}; Ctrl-C stops)", flush=True)
    serve(ctx, port=a.port, address=a.address, oauth_key=a.oauth_key,
          oauth_secret=a.oauth_secret)


def cmd_app(args):
    cfg = args.cfg
    ctx = _context(cfg, cfg.paths.db, cfg.paths.output)
    if not ctx.accounts.list() and not cfg.app.oauth_provider:
        print("no accounts yet: make one with 'contimg users add NAME --role admin'",
              file=sys.stderr)
    _serve(ctx, cfg)
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
        ctx = _context(args.cfg, out / "state" / "pipeline.sqlite3", out / "products")
        password = secrets.token_urlsafe(12)
        name = "demo-operator"
        if ctx.accounts.get(name) is not None:
            ctx.accounts.set_password(name, password)
        else:
            ctx.accounts.add(name, "operator", password)
        print(f"\noperator app: http://{args.cfg.app.address}:{args.cfg.app.port}/\n"
              f"  user {name}\n  password {password}\n(demo exit status {rc}; Ctrl-C "
              "stops the app)", flush=True)
        _serve(ctx, args.cfg)
        return rc

    return cmd


def add_subcommands(sub):
    """Register ``app`` and ``users`` (and ``--app`` on ``demo`` when it exists)."""
    from contimg.config import add_options

    s = sub.add_parser("app", help="the operator app: Panel pages and the REST API")
    add_options(s, "paths.db", "paths.output", "app.scheduler", "app.dashboard_url",
                "app.port", "app.address")
    s.set_defaults(func=cmd_app)

    u = sub.add_parser("users", help="accounts of the operator app")
    us = u.add_subparsers(dest="verb", required=True)
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
    for p in us.choices.values():
        add_options(p, "paths.db")
    u.set_defaults(func=cmd_users)

    demo = sub.choices.get("demo")
    if demo is not None:
        demo.add_argument("--app", action="store_true",
                          help="then serve the operator app on the demo's products "
                               "(--port, --address)")
        add_options(demo, "app.port", "app.address")
        demo.set_defaults(func=_demo_with_app(demo.get_default("func")))
