"""Several workers search one study in a real PostgreSQL server (started here, on loopback)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")


def _bin(name: str) -> str | None:
    for d in ("/usr/local/bin", "/usr/lib/postgresql/15/bin", "/usr/local/pgsql/bin"):
        p = Path(d) / name
        if p.exists():
            return str(p)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A throwaway PostgreSQL server on a free loopback port; its URL. As root (PostgreSQL
    refuses to run as root) the server runs as `nobody` through runuser."""
    import os
    import tempfile

    pytest.importorskip("psycopg2", reason="needs psycopg2-binary for optuna's RDB storage")
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL binaries (initdb, pg_ctl) are not installed")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="attnc-pg-")
    if os.geteuid() == 0:
        runuser = shutil.which("runuser")
        if runuser is None:
            pytest.skip("running as root without runuser: PostgreSQL refuses to run as root")
        import pwd

        nobody = pwd.getpwnam("nobody")
        os.chmod(root, 0o755)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
        prefix = [runuser, "-u", "nobody", "--"]
    data, sock = Path(root) / "data", Path(root) / "sock"
    port = _free_port()
    subprocess.run([*prefix, initdb, "-D", str(data), "-U", "attnc", "--auth=trust", "-E",
                    "UTF8"], check=True, capture_output=True)
    subprocess.run([*prefix, "mkdir", str(sock)], check=True)
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock}"
    subprocess.run([*prefix, pg_ctl, "-D", str(data), "-o", opts, "-l",
                    str(Path(root) / "pg.log"), "-w", "start"], check=True, capture_output=True)
    try:
        import psycopg2

        conn = None
        for _ in range(50):
            try:
                conn = psycopg2.connect(host="127.0.0.1", port=port, user="attnc",
                                        dbname="postgres")
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)
        assert conn is not None, "PostgreSQL did not accept connections"
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE tune")
        conn.close()
        yield f"postgresql+psycopg2://attnc@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


_WORKER = """
import sys, torch
from attnc.autotune.model import tiny_llama
from attnc.tune_api import autotune
m = tiny_llama(layers=2, heads=4, kv_heads=2, seed=0)
g = torch.Generator().manual_seed(1)
calib = torch.randint(0, 256, (1200,), generator=g)
held = torch.randint(0, 256, (400,), generator=g)
res = autotune(m, calib, heldout_ids=held, lengths=(64, 128), validation_length=192,
               trials=int(sys.argv[2]), rows=32, block=16, storage=sys.argv[1],
               study_name="shared", worker=sys.argv[3] == "worker", max_ppl_increase=0.05,
               seed=int(sys.argv[4]))
if res is not None:
    print("CHOSEN", res.report["chosen"]["latency"], len(res.report["trials"]))
"""


def test_two_workers_share_a_postgres_study(postgres, tmp_path):
    import optuna

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    # enough trials that both workers still find some left after their start-up (capture and
    # signals take a few seconds, a tiny-model trial a fraction of one)
    procs = [subprocess.Popen([sys.executable, str(script), postgres, "30", "worker", str(i)])
             for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0
    st = optuna.load_study(study_name="shared", storage=postgres)
    finished = [t for t in st.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) >= 30
    workers = {t.user_attrs.get("worker") for t in st.trials if t.state.name == "COMPLETE"}
    assert len(workers) == 2  # both processes ran trials of the one study
    # A final run finds the trials done, validates the front and writes the answer.
    out = subprocess.run([sys.executable, str(script), postgres, "30", "final", "0"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CHOSEN" in out.stdout
    assert len(optuna.load_study(study_name="shared", storage=postgres).trials) == len(st.trials)
