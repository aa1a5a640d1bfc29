"""A TLS cluster (issue 19 item 14): the certificates made by the documented command
(``deploy/make-certs.sh``), Dask pointed at ``deploy/security.yaml`` (its paths moved to
a temporary directory), a scheduler and a worker started from the command line with
``contimg cluster up`` on ``tls://``. A client with the cluster's certificate computes; a
plain ``tcp://`` client and a client whose certificate another CA signed are refused."""

from __future__ import annotations

import operator
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_cluster import _free_ports

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _certs(d: Path) -> Path:
    subprocess.run(["sh", str(ROOT / "deploy" / "make-certs.sh"), str(d)], check=True,
                   capture_output=True)
    return d


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("tls")
    certs = _certs(root / "tls")
    dask_dir = root / "dask"
    dask_dir.mkdir()
    text = (ROOT / "deploy" / "security.yaml").read_text()
    assert "/etc/contimg/tls" in text
    (dask_dir / "security.yaml").write_text(text.replace("/etc/contimg/tls", str(certs)))
    port, wport = _free_ports(2)
    address = f"tls://127.0.0.1:{port}"
    cfg = root / "contimg.toml"
    cfg.write_text(f'[dask]\nscheduler = "{address}"\nnodes = ["n0={root / "n0"}"]\n'
                   f'worker_threads = 1\nworker_port = {wport}\nrun_dir = "{root / "run"}"\n')
    env = dict(os.environ, DASK_CONFIG=str(dask_dir),
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    cli = [sys.executable, "-m", "contimg.cli", "--config", str(cfg), "cluster"]
    up = subprocess.run([*cli, "up"], env=env, capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield address, certs, root
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=60)


def _security(certs: Path):
    from distributed.security import Security

    return Security(tls_ca_file=str(certs / "ca.pem"), tls_client_cert=str(certs / "contimg.pem"),
                    tls_client_key=str(certs / "contimg.key"), require_encryption=True)


def test_a_tls_client_computes(tls_cluster):
    from distributed import Client

    address, certs, _ = tls_cluster
    with Client(address, security=_security(certs), timeout=20, set_as_default=False) as c:
        workers = c.scheduler_info()["workers"]
        assert [w["name"] for w in workers.values()] == ["n0"]
        assert all(a.startswith("tls://") for a in workers)     # workers talk TLS too
        assert c.submit(operator.add, 41, 1, pure=False).result(timeout=30) == 42


def test_a_plain_tcp_client_is_refused(tls_cluster):
    from distributed import Client

    address, _, _ = tls_cluster
    with pytest.raises((OSError, TimeoutError)):
        Client(address.replace("tls://", "tcp://"), timeout=5, set_as_default=False)


def test_a_client_of_another_ca_is_refused(tls_cluster):
    from distributed import Client

    address, _, root = tls_cluster
    other = _certs(root / "other")
    with pytest.raises((OSError, TimeoutError)):
        Client(address, security=_security(other), timeout=5, set_as_default=False)
