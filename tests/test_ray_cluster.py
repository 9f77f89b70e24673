"""`evomerge search --ray-address` against a real Ray head (`ray start --head`) on localhost, with evomerge's own lm-eval
evaluator on tiny models: the CLI joins the running cluster instead of starting one."""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from evomerge.run.ledger import Ledger
from test_search_loop import experiment, models  # noqa: F401  (module fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: str, port: int, log: Path, env: dict) -> subprocess.Popen:
    """`ray start --head --block` in its own session, so the head and every process it starts can be killed together.
    Every port is free, not Ray's default, so it never meets another Ray on this machine."""
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    if importlib.util.find_spec("grpc"):  # Ray Client needs grpc: without it, Ray refuses this flag
        flags.append("--ray-client-server-port")
    ports = {flag: free_port() for flag in flags}
    command = [sys.executable, "-m", "ray.scripts.scripts",  # the `ray` command, wherever PATH points
               "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1",
               f"--temp-dir={temp_dir}", "--include-dashboard=false", "--disable-usage-stats",
               *(f"{flag}={p}" for flag, p in ports.items())]
    head = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 30
    while "Ray runtime started" not in log.read_text():
        assert head.poll() is None and time.time() < deadline, f"ray start failed:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return head


@pytest.mark.slow  # ~20 s on 2 busy cores: a Ray head, and two workers that import torch and lm-eval
def test_search_joins_a_running_ray_cluster(models, tmp_path):  # noqa: F811
    pytest.importorskip("ray")
    doc = experiment(models, **{"budget.trials": 4, "workers.num": 2, "validation.top_k": 1,
                                "optimizer": {"name": "random"}})
    doc["evaluation"] = {"tasks": ["toy_digits"], "limit": 4}  # evomerge's lm-eval evaluator, 4 documents a trial
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(doc))
    # The workers inherit the head's environment. Token authentication on, with a token of this test's own: the way Ray
    # (2.5x+) starts a head whenever ~/.ray/auth_token exists, and a driver given an explicit address needs to be told.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths must stay under 107 characters
    port = free_port()
    head = start_head(temp_dir, port, tmp_path / "ray.log", env)
    try:
        search = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(exp), "--run-dir",
                                 str(tmp_path / "run"), "--ray-address", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert search.returncode == 0, search.stderr[-3000:]
        assert "winner: trial" in search.stdout
    finally:  # the head, its workers and everything else it started: one process group, this test's alone
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    trials = ledger.trials("search")
    assert sorted(t.candidate for t in trials) == [0, 1, 2, 3] and all(t.ok for t in trials)
    assert {t.worker for t in trials} <= {"ray-0", "ray-1"} and all(t.scores["toy_digits"]["n"] == 4 for t in trials)
    assert len(ledger.trials("validation")) == 1 and len(ledger.trials("test")) == 1
    assert (tmp_path / "run" / "best" / "recipe.yaml").exists() and (tmp_path / "run" / "best" / "scores.json").exists()
    frozen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert frozen["workers"]["backend"] == "ray" and frozen["workers"]["ray_address"] == f"127.0.0.1:{port}"
