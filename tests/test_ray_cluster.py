"""`evomerge search --ray-address` against a real Ray head (`ray start --head`) on localhost, with evomerge's own lm-eval
evaluator on tiny models: the CLI joins the running cluster instead of starting one."""

from __future__ import annotations

import contextlib
import importlib.util
import json
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
from test_search_loop import DistanceEvaluator, experiment, models  # noqa: F401  (module fixture)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: str, port: int, log: Path, env: dict, cpus: int = 2) -> subprocess.Popen:
    """`ray start --head --block` in its own session, so the head and every process it starts can be killed together.
    Every port is free, not Ray's default, so it never meets another Ray on this machine."""
    return start_node(temp_dir, log, env, ["--head", f"--port={port}", f"--num-cpus={cpus}", "--include-dashboard=false",
                                           "--disable-usage-stats"], head=True)


def join_node(temp_dir: str, address: str, log: Path, env: dict, cpus: int = 1) -> subprocess.Popen:
    """A second node on this machine (`ray start --address --block`): its own temp dir, ports and process group."""
    return start_node(temp_dir, log, env, [f"--address={address}", f"--num-cpus={cpus}"], head=False)


def start_node(temp_dir: str, log: Path, env: dict, flags: list[str], head: bool) -> subprocess.Popen:
    ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
             "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
    if head and importlib.util.find_spec("grpc"):  # Ray Client needs grpc: without it, Ray refuses this flag
        ports.append("--ray-client-server-port")
    command = [sys.executable, "-m", "ray.scripts.scripts",  # the `ray` command, wherever PATH points
               "start", "--block", *flags, "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               *(f"{flag}={free_port()}" for flag in ports)]
    node = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 60
    while "Ray runtime started" not in log.read_text():
        assert node.poll() is None and time.time() < deadline, f"ray start failed:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)
    return node


def stop_node(node: subprocess.Popen) -> None:
    """The node's `ray start`, raylet, workers and everything else it started, at once, as a machine going away: its
    process group (this test's alone) and every descendant (Ray's worker processes may leave the group)."""
    pids = [node.pid, *descendants(node.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    node.wait()


def descendants(pid: int) -> list[int]:
    """The pids of every process under `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid, ...
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


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
    finally:
        stop_node(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
    ledger = Ledger(tmp_path / "run" / "ledger.sqlite")
    trials = ledger.trials("search")
    assert sorted(t.candidate for t in trials) == [0, 1, 2, 3] and all(t.ok for t in trials)
    assert {t.worker for t in trials} <= {"ray-0", "ray-1"} and all(t.scores["toy_digits"]["n"] == 4 for t in trials)
    assert len(ledger.trials("validation")) == 1 and len(ledger.trials("test")) == 1
    assert (tmp_path / "run" / "best" / "recipe.yaml").exists() and (tmp_path / "run" / "best" / "scores.json").exists()
    frozen = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert frozen["workers"]["backend"] == "ray" and frozen["workers"]["ray_address"] == f"127.0.0.1:{port}"


# -- a cluster of two nodes, one of which goes away mid-run -------------------------------------------------------------

class NodeEvaluator(DistanceEvaluator):
    """The search loop's test evaluator, which also reports the Ray node it ran on (a score the ledger keeps)."""

    def evaluate(self, model, split, limit=None):
        import ray

        evaluation = super().evaluate(model, split, limit)
        evaluation.scores["node"] = {"id": ray.get_runtime_context().get_node_id()}
        return evaluation


def node_evaluator_factory(models: dict, delay: float):
    return lambda evaluation, base: NodeEvaluator(models["base"], models["experts"], delay=delay)


DRIVER = """
import sys
sys.path[:0] = {paths!r}
from test_ray_cluster import node_evaluator_factory
from test_search_loop import experiment
from evomerge.run.config import experiment_from_dict
from evomerge.run.loop import search
models, run_dir, overrides = {models!r}, {run_dir!r}, {overrides!r}
search(experiment_from_dict(experiment(models, **overrides)), run_dir, node_evaluator_factory(models, delay=1.0),
       progress=False)
"""


@pytest.fixture
def two_nodes(tmp_path):
    """A head and a second node on this machine, one CPU each (so two workers land one on each): (address, the second
    node's process, the environment of both). Fast node-death detection: the head's health checks every 0.5 s."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
           "RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "500",
           "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
    dirs = [tempfile.mkdtemp(prefix="r", dir="/tmp") for _ in range(2)]  # short: socket paths < 107 characters
    port, nodes = free_port(), []
    try:
        nodes.append(start_head(dirs[0], port, tmp_path / "head.log", env, cpus=1))
        nodes.append(join_node(dirs[1], f"127.0.0.1:{port}", tmp_path / "node.log", env, cpus=1))
        yield f"127.0.0.1:{port}", nodes[1], env
    finally:
        for node in reversed(nodes):
            stop_node(node)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)


def _nodes(run_dir: Path) -> list[tuple[int, str]]:
    """(candidate, node id) of each search row, in the order the driver wrote them."""
    try:
        ledger = Ledger(run_dir / "ledger.sqlite")
    except Exception:  # not created yet  # noqa: BLE001
        return []
    try:
        return [(t.candidate, t.scores["node"]["id"]) for t in ledger.trials("search")]
    finally:
        ledger.close()


@pytest.mark.slow  # ~60 s on 2 busy cores: two Ray nodes, two workers that import torch, 12 trials of 1 s
def test_a_search_on_two_nodes_finishes_on_the_survivor_when_one_dies(models, tmp_path, two_nodes):  # noqa: F811
    pytest.importorskip("ray")
    from test_search_loop import genomes, run

    address, second, env = two_nodes
    overrides = {"budget.trials": 12, "optimizer": {"name": "cmaes", "options": {"sigma0": 0.3, "popsize": 4}}}
    run(models, tmp_path / "local", **overrides)  # the same search on one process
    on_ray = {**overrides, "workers": {"backend": "ray", "num": 2, "ray_address": address}}
    script = DRIVER.format(paths=[p for p in sys.path if p], models=models, run_dir=str(tmp_path / "ray"),
                           overrides=on_ray)
    driver = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while len({node for _, node in _nodes(tmp_path / "ray")}) < 2 or len(_nodes(tmp_path / "ray")) < 4:
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            assert time.time() < deadline, "the workers never ran on both nodes"
            time.sleep(0.05)
        stop_node(second)  # mid-trial: each takes 1 s, and both workers are busy
        killed_at = len(_nodes(tmp_path / "ray"))
        try:
            _, err = driver.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # e.g. its trial waits for a replacement that no node has room for
            pytest.fail("the search did not finish within 120 s of the node's death")
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert driver.returncode == 0, err[-3000:]
    rows = _nodes(tmp_path / "ray")
    assert sorted(c for c, _ in rows) == list(range(12))  # every trial recorded, once
    assert genomes(tmp_path / "ray") == genomes(tmp_path / "local")
    ledger = Ledger(tmp_path / "ray" / "ledger.sqlite")
    assert all(t.ok for t in ledger.trials("search")) and len(ledger.trials("test")) == 1
    fitness = {t.candidate: t.fitness for t in ledger.trials("search")}
    ledger.close()
    local = Ledger(tmp_path / "local" / "ledger.sqlite")
    assert fitness == {t.candidate: t.fitness for t in local.trials("search")}
    local.close()
    # The node that stayed ran every trial recorded after the kill (a result the dead node had sent before it may be
    # written just after: the one row after the count).
    survivor = rows[-1][1]
    assert {node for _, node in rows[:killed_at]} == {survivor, next(n for _, n in rows if n != survivor)}
    assert {node for _, node in rows[killed_at + 1:]} == {survivor} and len(rows) - killed_at >= 4
    assert json.loads((tmp_path / "ray" / "best" / "scores.json").read_text())["trials"] == 12


@pytest.mark.slow  # ~20 s: a local Ray and one worker process
def test_a_run_left_without_workers_stops_with_one_line_and_resumes(models, tmp_path):  # noqa: F811
    """Its only worker dies and the replacement is not ready within the placement timeout (here 0.5 s: a new worker
    process takes longer to load): the run stops, every trial scored so far is in the ledger, and resume finishes it."""
    pytest.importorskip("ray")
    from functools import partial

    from evomerge.errors import EvomergeError
    from evomerge.run.config import experiment_from_dict
    from evomerge.run.loop import resume, search
    from evomerge.run.pool import RayPool, RunnerSpec
    from test_search_loop import evaluator_factory, genomes, run

    overrides = {"budget.trials": 6, "workers.num": 1, "optimizer": {"name": "cmaes", "options": {"popsize": 3}}}
    run(models, tmp_path / "local", **overrides)
    exp = experiment_from_dict(experiment(models, **overrides))
    make = evaluator_factory(models, die_once=str(tmp_path / "died"))  # the worker dies in its second trial
    spec = RunnerSpec((models["base"], *models["experts"]), models["base"], partial(make, exp.evaluation, models["base"]))
    with RayPool(spec, 1) as pool:
        pool.placement_timeout_s = 0.5  # for the replacement only: the first worker was given the default to start
        with pytest.raises(EvomergeError, match=r"^workers: no Ray worker left: 1 replacement\(s\) for workers that "
                                                r"died could not be placed within 0.5 s"):
            search(exp, tmp_path / "ray", make, pool=pool, progress=False)
    assert [c for c, _ in genomes(tmp_path / "ray")] == [0]  # the trial scored before the death
    resume(tmp_path / "ray", evaluator_factory(models), progress=False)
    assert genomes(tmp_path / "ray") == genomes(tmp_path / "local")
