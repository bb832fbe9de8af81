"""Real Airflow for the tests: an API server on SQLite, or a CeleryExecutor cluster.

The cluster is what DESIGN.md section 5 deploys, on localhost: PostgreSQL (metadata DB) and
Redis (Celery broker) on free ports with their data in temp folders, installed with apt-get when
missing; then ``airflow db migrate``, the ``gpu`` and ``dvc`` pools, and the api-server,
scheduler, dag-processor and a Celery worker serving the ``default`` and ``gpu`` queues. Tests
drive it through the public REST API with a JWT from the auth endpoint, or through the
``airflow`` CLI against its metadata DB (``airflow backfill create``). Everything started here
is stopped here, on failure too: each process runs in its own session and is ended by its id.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
AIRFLOW = str(BIN / "airflow")
SIMPLE_AUTH = "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
USER, PASSWORD = "cg4ctr", "cg4ctr-test-password"
TERMINAL = {"success", "failed"}

# A two-task DAG for the harness itself: the second task is routed like `generate` (gpu pool and
# queue) and renders the plugin's macro on the worker, proving plugins load there too.
PROBE_DAG = """
from datetime import datetime

from airflow.sdk import dag, task


@dag(dag_id="cg4ctr_probe", schedule=None, start_date=datetime(2026, 1, 1), catchup=False,
     max_active_runs=1, tags=["cg4ctr", "test"])
def cg4ctr_probe():
    @task.bash
    def hello() -> str:
        return 'echo "probe {{ ds }} on $(hostname)"'

    @task.bash(pool="gpu", queue="gpu")
    def on_gpu() -> str:
        return 'echo "gpu task {{ ds }} round=[{{ macros.cg4ctr.round_tag_for(ds) }}]"'

    hello() >> on_gpu()


cg4ctr_probe()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A started process with its log; ``stop`` ends its whole session (its children too)."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return f"--- {self.name} ({self.log}) ---\n" + "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout_s: float = 30) -> None:
        if self.proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # the group this process leads (start_new_session)
            try:
                self.proc.wait(timeout=timeout_s)
                return
            except subprocess.TimeoutExpired:
                continue


def start_service(name: str, args: list[str], env: dict[str, str], logs: Path) -> Service:
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    with log.open("ab") as sink:
        proc = subprocess.Popen(
            args, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Service(name, proc, log)


def run(args: list[str], env: dict[str, str] | None = None, timeout_s: float = 600) -> str:
    """Run a setup command; on failure raise with its output (a failed fixture says why)."""
    proc = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def airflow_env(home: Path, api_port: int, **config: str) -> dict[str, str]:
    """Environment of every Airflow process of one deployment (config as AIRFLOW__S__K vars)."""
    home.mkdir(parents=True, exist_ok=True)
    passwords = home / "passwords.json"
    passwords.write_text(f'{{"{USER}": "{PASSWORD}"}}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__AUTH_MANAGER": SIMPLE_AUTH,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{api_port}",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
            "AIRFLOW__API__SECRET_KEY": secrets.token_hex(16),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        }
    )
    env.update({f"AIRFLOW__{key.upper()}": value for key, value in config.items()})
    return env


@dataclass
class AirflowApi:
    """The REST API (``/api/v2``) as a logged-in user, through the real login endpoint."""

    base_url: str
    token: str = ""
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    def login(self, username: str = USER, password: str = PASSWORD) -> str:
        resp = self.client.post(
            f"{self.base_url}/auth/token", json={"username": username, "password": password}
        )
        resp.raise_for_status()
        self.token = str(resp.json()["access_token"])
        return self.token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return self.client.request(method, f"{self.base_url}{path}", headers=headers, **kwargs)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.request(method, path, **kwargs)
        if resp.is_error:
            raise RuntimeError(f"{method} {path}: {resp.status_code} {resp.text[:500]}")
        return resp.json()

    def wait_healthy(self, service: Service, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if service.proc.poll() is not None:
                raise RuntimeError(f"{service.name} exited early\n{service.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get(f"{self.base_url}/api/v2/monitor/health").status_code == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"{service.name} not healthy after {timeout_s} s\n{service.tail()}")

    def wait_for_dag(
        self,
        dag_id: str,
        timeout_s: float = 240,
        until: Callable[[dict[str, Any]], bool] = lambda details: True,
    ) -> dict[str, Any]:
        """Wait until the dag-processor has serialised ``dag_id`` (and, with ``until``, a parse
        whose details pass it: e.g. a new schedule after params.yaml changed); its details."""
        deadline = time.monotonic() + timeout_s
        details: dict[str, Any] = {}
        while time.monotonic() < deadline:
            resp = self.request("GET", f"/api/v2/dags/{dag_id}/details")
            if resp.status_code == 200:
                details = resp.json()
                if until(details):
                    return details
            time.sleep(2)
        errors = self.call("GET", "/api/v2/importErrors")
        raise TimeoutError(
            f"DAG {dag_id} not parsed as expected after {timeout_s} s: {details}; "
            f"import errors: {errors}"
        )

    def unpause(self, dag_id: str) -> None:
        self.call("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})

    def set_pool(self, name: str, slots: int) -> None:
        body = {"name": name, "slots": slots, "description": "cg4ctr", "include_deferred": False}
        if self.request("GET", f"/api/v2/pools/{name}").status_code == 200:
            self.call("PATCH", f"/api/v2/pools/{name}", json=body)
        else:
            self.call("POST", "/api/v2/pools", json=body)

    def trigger(
        self, dag_id: str, logical_date: str | None, conf: dict[str, Any] | None = None
    ) -> str:
        """Create a DAG run for a logical date (``YYYY-MM-DD``, midnight UTC; None: a dateless
        run, which Airflow starts whatever the DAG's start_date); its run id."""
        body = {
            "logical_date": None if logical_date is None else f"{logical_date}T00:00:00Z",
            "conf": conf or {},
        }
        run = self.call("POST", f"/api/v2/dags/{dag_id}/dagRuns", json=body)
        return str(run["dag_run_id"])

    def runs(self, dag_id: str) -> list[dict[str, Any]]:
        """Every run of ``dag_id``, oldest logical date first."""
        path = f"/api/v2/dags/{dag_id}/dagRuns"
        found = self.call("GET", path, params={"limit": 1000, "order_by": "logical_date"})
        return list(found["dag_runs"])

    def delete_run(self, dag_id: str, run_id: str) -> None:
        resp = self.request("DELETE", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        if resp.is_error:
            raise RuntimeError(f"deleting {dag_id} {run_id}: {resp.status_code} {resp.text[:500]}")

    def wait_for_run(
        self, dag_id: str, run_id: str, timeout_s: float, services: tuple[Service, ...] = ()
    ) -> str:
        """Poll the run until it is terminal; its state. Fails early when a service died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for service in services:
                if service.proc.poll() is not None:
                    raise RuntimeError(f"{service.name} died during {run_id}\n{service.tail()}")
            state = str(self.call("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")["state"])
            if state in TERMINAL:
                return state
            if self.call("GET", f"/api/v2/dags/{dag_id}")["has_import_errors"]:
                # a DAG that no longer parses goes stale: the scheduler stops its running runs
                errors = self.call("GET", "/api/v2/importErrors")
                raise RuntimeError(f"{dag_id} stopped parsing during {run_id}: {errors}")
            time.sleep(2)
        states = self.task_states(dag_id, run_id)
        raise TimeoutError(f"{dag_id} {run_id} not finished after {timeout_s} s: {states}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return list(self.call("GET", path, params={"limit": 1000})["task_instances"])

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task_id -> state; a mapped task's instances are joined as ``task_id[i]``."""
        states: dict[str, str | None] = {}
        for ti in self.task_instances(dag_id, run_id):
            index = ti.get("map_index", -1)
            key = ti["task_id"] if index in (-1, None) else f"{ti['task_id']}[{index}]"
            states[key] = ti["state"]
        return states


@contextlib.contextmanager
def api_server(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[AirflowApi]:
    """An API server on SQLite in ``home`` with one SimpleAuthManager user; stopped on exit."""
    port = free_port()
    dags = home / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    env = {**airflow_env(home, port, core__dags_folder=str(dags)), **(extra_env or {})}
    run([AIRFLOW, "db", "migrate"], env=env)
    server = start_service("api-server", [AIRFLOW, "api-server"], env, home / "logs")
    try:
        api = AirflowApi(f"http://127.0.0.1:{port}")
        api.wait_healthy(server)
        yield api
    finally:
        server.stop()


# --- PostgreSQL and Redis on localhost ---------------------------------------------------------

_APT_UPDATED = False


def apt_install(*packages: str) -> None:
    """Install Debian packages non-interactively (CI is root with no stdin)."""
    global _APT_UPDATED
    if os.geteuid() != 0:
        pytest.skip(f"{' '.join(packages)} missing and not root: install them to run this test")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not _APT_UPDATED:
        run(["apt-get", "update", "-q"], env=env)
        _APT_UPDATED = True
    run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], env=env)


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's bin folder (Debian keeps it off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if not found:
        apt_install("postgresql")
        return postgres_bin()
    return Path(found[-1]).parent


def redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        apt_install("redis-server")
        path = shutil.which("redis-server")
    assert path, "redis-server not found after installing it"
    return path


@contextlib.contextmanager
def postgres(port: int) -> Iterator[str]:
    """A throw-away PostgreSQL cluster on 127.0.0.1:port with database ``airflow``; its URL.

    initdb refuses root, so as root the cluster belongs to the ``postgres`` user (made by the
    Debian package) and lives in a private temp folder it owns.
    """
    bindir = postgres_bin()
    data = Path(tempfile.mkdtemp(prefix="cg4ctr-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        as_owner = ["runuser", "-u", "postgres", "--"]
    cluster = data / "cluster"
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off"
    pg_ctl = [*as_owner, str(bindir / "pg_ctl"), "-D", str(cluster)]
    try:
        run(
            [
                *as_owner,
                str(bindir / "initdb"),
                "-D",
                str(cluster),
                "-U",
                "airflow",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]
        )
        run([*pg_ctl, "-l", str(data / "postgres.log"), "-o", options, "-w", "-t", "120", "start"])
        try:
            run(
                [
                    str(bindir / "createdb"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(port),
                    "-U",
                    "airflow",
                    "airflow",
                ]
            )
            yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
        finally:
            run([*pg_ctl, "-m", "fast", "-w", "-t", "60", "stop"])
    finally:
        shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def redis(port: int, logs: Path) -> Iterator[str]:
    """A Redis without persistence on 127.0.0.1:port; its broker URL."""
    server = start_service(
        "redis",
        [
            redis_server(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(logs),
        ],
        dict(os.environ),
        logs,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if server.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis did not start\n{server.tail()}")
            time.sleep(0.2)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.stop()


# --- the CeleryExecutor cluster ----------------------------------------------------------------


# No schedule: runs start only when triggered, so unpausing the nightly never starts a run of its
# own beside the triggered ones.
MANUAL = "airflow:\n  schedule: null\n"


def tiny_params(folder: Path, airflow: str = MANUAL) -> Path:
    """A workspace folder with the cycle tests' tiny sizes plus an ``airflow`` section."""
    from tests.test_cycle import TINY  # here, not at import: pytest rewrites it as a test module

    folder.mkdir(parents=True)
    (folder / "params.yaml").write_text(TINY + airflow)
    return folder


def sim_workspace(folder: Path, seed: int, airflow: str = MANUAL) -> Path:
    """A tiny simulated world in ``folder`` (see ``tiny_params``)."""
    from cg4ctr_tasks.sim.world import init_world
    from cg4ctr_tasks.workspace import Workspace

    init_world(Workspace.open(tiny_params(folder, airflow)), seed=seed)
    return folder


@dataclass
class CeleryCluster:
    api: AirflowApi
    dags: Path
    workspace: Path  # what $CG4CTR_WORKSPACE names: a link to the workspace in use
    env: dict[str, str]
    services: list[Service]

    def logs(self) -> str:
        return "\n".join(service.tail() for service in self.services)

    def use_workspace(self, folder: Path) -> None:
        """Point the deployment at another workspace, between runs: the link is replaced
        atomically and every task and DAG parse resolves it when it starts."""
        staged = self.workspace.with_name(f"{self.workspace.name}.new")
        staged.unlink(missing_ok=True)
        staged.symlink_to(folder.resolve(), target_is_directory=True)
        os.replace(staged, self.workspace)

    def airflow(self, *args: str) -> str:
        """The ``airflow`` CLI against this deployment's metadata DB; its stdout."""
        return run([AIRFLOW, *args], env=self.env)

    def run_dag(self, dag_id: str, logical_date: str | None, timeout_s: float) -> tuple[str, str]:
        """Trigger ``dag_id`` for a date (None: dateless) and wait; (run id, terminal state)."""
        run_id = self.api.trigger(dag_id, logical_date)
        return run_id, self.wait(dag_id, run_id, timeout_s)

    def wait(self, dag_id: str, run_id: str, timeout_s: float) -> str:
        """Wait for a run however it was created; its terminal state (the logs on time-out)."""
        try:
            return self.api.wait_for_run(dag_id, run_id, timeout_s, tuple(self.services))
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.logs()}") from None


@contextlib.contextmanager
def celery_cluster(root: Path, workspace: Path) -> Iterator[CeleryCluster]:
    """Postgres + Redis + api-server, scheduler, dag-processor and a Celery worker.

    The DAG folder holds copies of the project's DAGs and the probe DAG; workers find the
    workspace through ``$CG4CTR_WORKSPACE`` (a link to ``workspace``, see ``use_workspace``) and
    the CLI in ``$CG4CTR_BIN`` (this venv's).
    """
    dags = root / "dags"
    dags.mkdir(parents=True, exist_ok=True)
    for source in (REPO / "dags").glob("*.py"):
        shutil.copy(source, dags / source.name)
    (dags / "cg4ctr_probe.py").write_text(PROBE_DAG)
    logs = root / "logs"
    link = root / "workspace"
    link.symlink_to(workspace.resolve(), target_is_directory=True)
    api_port = free_port()
    with postgres(free_port()) as db_url, redis(free_port(), logs) as broker_url:
        env = airflow_env(
            root / "airflow-home",
            api_port,
            core__executor="CeleryExecutor",
            core__dags_folder=str(dags),
            core__parallelism="8",
            database__sql_alchemy_conn=db_url,
            celery__broker_url=broker_url,
            celery__result_backend=f"db+{db_url}",  # SQLAlchemy 2.1 defaults to psycopg 3
            celery__worker_concurrency="2",
            dag_processor__refresh_interval="5",
            scheduler__scheduler_heartbeat_sec="2",
        )
        env.update({"CG4CTR_WORKSPACE": str(link), "CG4CTR_BIN": str(BIN / "cg4ctr")})
        run([AIRFLOW, "db", "migrate"], env=env)
        commands = {
            "api-server": [AIRFLOW, "api-server"],
            "scheduler": [AIRFLOW, "scheduler"],
            "dag-processor": [AIRFLOW, "dag-processor"],
            "celery-worker": [
                AIRFLOW,
                "celery",
                "worker",
                "--queues",
                "default,gpu",
                "--concurrency",
                "2",
                "--without-mingle",
                "--without-gossip",
            ],
        }
        services: list[Service] = []
        try:
            for name, args in commands.items():
                services.append(start_service(name, args, env, logs))
            api = AirflowApi(f"http://127.0.0.1:{api_port}")
            api.wait_healthy(services[0])
            for service in services:
                if service.proc.poll() is not None:
                    raise RuntimeError(f"{service.name} exited at start\n{service.tail()}")
            api.login()
            api.set_pool("gpu", 1)
            api.set_pool("dvc", 1)
            yield CeleryCluster(api, dags, link, env, services)
        finally:
            for service in reversed(services):
                service.stop()


@pytest.fixture(scope="session")
def airflow_celery(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryCluster]:
    """One CeleryExecutor cluster for all Celery tests, pointed at a workspace holding only a
    params.yaml (the DAGs parse); tests build worlds with ``sim_workspace`` and switch to them."""
    root = tmp_path_factory.mktemp("celery-cluster")
    with celery_cluster(root, tiny_params(root / "workspaces" / "initial")) as cluster:
        yield cluster
