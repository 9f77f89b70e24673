"""Optuna's study in a real PostgreSQL server (`optimizer.options.storage: postgresql://...`), the storage a cluster user
shares between machines: a TPE search killed with SIGKILL mid-run and continued with `evomerge resume` proposes the same
candidates, scores them the same, and picks the same winner as a run that was never interrupted.

The server is the distribution's package (Debian/Ubuntu: `apt-get install postgresql`, binaries under
/usr/lib/postgresql/<version>/bin), started by the fixture in a temp dir on a free port and stopped after the module.
As root it runs as the package's `postgres` user (the server refuses to run as root).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from evomerge.run.ledger import Ledger
from test_checks import experiment
from test_ray_cluster import free_port
from test_search_loop import _rows


def postgres_binaries() -> Path | None:
    """The newest installed server's bin dir (Debian keeps it off PATH), else the dir of a `pg_ctl` on PATH."""
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if installed:
        return installed[-1].parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).resolve().parent if on_path else None


@pytest.fixture(scope="module")
def postgres_url():
    """postgresql+psycopg://postgres@127.0.0.1:PORT/postgres: a server of this module's own (trust authentication).
    The driver is named: SQLAlchemy's default for postgresql:// is psycopg2 before 2.1, psycopg (3) from 2.1 on."""
    binaries = postgres_binaries()
    if binaries is None or not (binaries / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql; .ci/run installs them)")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (the test extra: pip install -e .[test])")
    root = Path(tempfile.mkdtemp(prefix="evomerge-pg-"))  # in /tmp: the server's user must reach it
    user = {}
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root, and no `postgres` user to run the server as (the package makes one)")
        user = {"user": "postgres", "group": "postgres"}
        shutil.chown(root, "postgres", "postgres")
    data, port = root / "data", free_port()

    def pg(tool: str, *args):
        return subprocess.run([str(binaries / tool), *args], capture_output=True, text=True, timeout=60, **user)

    init = pg("initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
    assert init.returncode == 0, init.stdout + init.stderr
    started = pg("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start", "-o",
                 f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off")
    try:
        assert started.returncode == 0, started.stdout + started.stderr + (root / "server.log").read_text()
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        stopped = pg("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
        pid_file = data / "postmaster.pid"
        if stopped.returncode != 0 and pid_file.exists():  # pg_ctl could not stop it: the server's own pid
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _experiment(zoo: Path, path: Path, storage: str, study: str) -> Path:
    doc = experiment(zoo, optimizer={"name": "tpe", "options": {"n_startup_trials": 3, "storage": storage,
                                                                "study_name": study}},
                     budget={"trials": 10}, evaluation={"tasks": ["toy_digits"], "limit": 4}, validation={"top_k": 0})
    path.write_text(yaml.safe_dump(doc))
    return path


def _cli(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def _finished(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def trajectory(run_dir: Path) -> list[tuple]:
    ledger = Ledger(run_dir / "ledger.sqlite")
    try:
        return [(t.candidate, t.genome, t.status, t.fitness) for t in sorted(ledger.trials("search"),
                                                                               key=lambda t: t.candidate)]
    finally:
        ledger.close()


@pytest.mark.slow  # ~60-120 s on 2 busy cores: three CLI runs (each imports torch and lm-eval), two at once
def test_tpe_on_postgres_killed_mid_run_and_resumed_equals_an_uninterrupted_run(postgres_url, tiny_zoo, tmp_path):
    import optuna

    # Both start at once on the server's fresh database: they race to create optuna's tables (optuna_samplers)
    reference = _cli("search", str(_experiment(tiny_zoo, tmp_path / "reference.yaml", postgres_url, "reference")),
                     "--run-dir", str(tmp_path / "reference"))
    killed = tmp_path / "killed"
    proc = _cli("search", str(_experiment(tiny_zoo, tmp_path / "killed.yaml", postgres_url, "killed")),
                "--run-dir", str(killed))
    deadline = time.time() + 240  # start-up on a loaded machine
    while _rows(killed / "ledger.sqlite") < 5:  # past TPE's 3 startup trials: the model is in use
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert 5 <= _rows(killed / "ledger.sqlite") < 10  # killed mid-run
    winner = _finished(reference).splitlines()[0]
    assert _finished(_cli("resume", str(killed))).splitlines()[0] == winner

    assert trajectory(killed) == trajectory(tmp_path / "reference")
    assert len(trajectory(killed)) == 10 and all(t[2] == "ok" for t in trajectory(killed))
    assert json.loads((killed / "best" / "scores.json").read_text()) == \
        json.loads((tmp_path / "reference" / "best" / "scores.json").read_text())
    # The study lives in PostgreSQL, not in the run dir: its finished trials are the ledger's candidates
    assert not (killed / "optuna.sqlite3").exists()
    for study, run_dir in (("reference", tmp_path / "reference"), ("killed", killed)):
        trials = optuna.load_study(study_name=study, storage=postgres_url).get_trials(
            states=(optuna.trial.TrialState.COMPLETE,))
        assert [[t.params[f"x{i}"] for i in range(len(t.params))] for t in trials] == \
            [genome for _, genome, _, _ in trajectory(run_dir)]


def test_a_storage_without_its_driver_or_server_is_one_line():
    from evomerge.errors import EvomergeError
    from evomerge.optim import make_optimizer

    nobody = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    with pytest.raises(EvomergeError, match=r"^optimizer.options.storage: cannot open the study's database "
                                            r"postgresql\+psycopg://.* \(connection failed: .*\)$"):
        make_optimizer("tpe", [0.0], [1.0], options={"storage": nobody})
    with pytest.raises(EvomergeError, match=r"^optimizer.options.storage: no database driver for postgresql\+nosuch://"):
        make_optimizer("tpe", [0.0], [1.0], options={"storage": "postgresql+nosuch://postgres@127.0.0.1/db"})
