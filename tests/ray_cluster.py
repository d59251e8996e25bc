"""A throw-away two-node Ray cluster on loopback for tests and benchmarks: the head on 127.0.0.2, a
worker on 127.0.0.3 (never 127.0.0.1: Ray would swap in the machine's interface address), each
``ray start --block`` with every port chosen free and its own temp dir, both in one process group.

``stop`` ends the process groups, then any process still naming this cluster's temp dir, by PID
(never ``ray stop``, which kills every Ray process on a shared machine by name)."""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.server_process import ROOT, free_port

HEAD, WORKER = "127.0.0.2", "127.0.0.3"


def ray_cli(module: str = "ray.scripts.scripts") -> list[str]:
    """The ``ray`` (or, with ``ray.serve.scripts``, the ``serve``) command of this interpreter. Run as
    a module: a console script's first line names the interpreter of the venv it was installed in,
    which breaks when the venv is moved or shared."""
    return [sys.executable, "-m", module]


def _ports(*flags: str) -> list[str]:
    return [arg for flag in flags for arg in (flag, str(free_port()))]


class RayCluster:
    def __init__(self, env: dict[str, str], cpus_per_node: int = 2) -> None:
        self.temp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.gcs_port = free_port()
        self.address = f"{HEAD}:{self.gcs_port}"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", **env}
        self.procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []

        def common() -> list[str]:  # fresh ports for each node: some bind every address
            return ["--num-cpus", str(cpus_per_node), "--disable-usage-stats", "--block",
                    *_ports("--node-manager-port", "--object-manager-port", "--metrics-export-port",
                            "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                            "--runtime-env-agent-port")]

        ray = ray_cli()
        self.client_port = free_port()  # Ray Client (ray://): how `serve run` reaches the cluster from outside
        # one temp dir per node: nodes on one machine must not share socket paths
        head = [*ray, "start", "--temp-dir", f"{self.temp}/h", "--head", "--node-ip-address", HEAD,
                "--port", str(self.gcs_port), "--include-dashboard", "false",
                "--ray-client-server-port", str(self.client_port), *common()]
        worker = [*ray, "start", "--temp-dir", f"{self.temp}/w", "--node-ip-address", WORKER,
                  "--address", self.address, *common()]
        self._logs = [Path(self.temp) / "head.out", Path(self.temp) / "worker.out"]
        # Both nodes under one launcher in one new session: one process group to stop, and one
        # scheduler autogroup (Linux shares CPU between sessions first), like one server process.
        script = (f"{shlex.join(head)} >{self._logs[0]} 2>&1 & "
                  f"until (exec 3<>/dev/tcp/{HEAD}/{self.gcs_port}) 2>/dev/null; do sleep 0.2; done; "
                  f"{shlex.join(worker)} >{self._logs[1]} 2>&1 & wait")
        try:
            self.procs.append(subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                               start_new_session=True))
            self._wait_port(HEAD, self.gcs_port, 90)
            self._wait_nodes(2, 120)
        except BaseException:
            self.stop()
            raise

    def _wait_nodes(self, count: int, timeout: float) -> None:
        """Until ``count`` raylets run (each node's raylet is up before it registers with the head)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("ray start exited:\n" + self.logs())
            if sum(p.exists() and "ray runtime started" in p.read_text(errors="replace").lower()
                   for p in self._logs) >= count:
                return
            time.sleep(0.3)
        raise RuntimeError("the Ray nodes did not come up:\n" + self.logs())

    def _wait_port(self, host: str, port: int, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError("ray start exited:\n" + self.logs())
            try:
                socket.create_connection((host, port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("the Ray head did not come up:\n" + self.logs())

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in self._logs if p.exists())

    def _leftover_pids(self) -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit() and int(d.name) != os.getpid():
                try:
                    if self.temp.encode() in (d / "cmdline").read_bytes():
                        pids.append(int(d.name))
                except OSError:
                    pass
        return pids

    def stop(self) -> None:
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
            except ProcessLookupError:
                pass
        for _ in range(2):  # workers Ray started in sessions of their own, named by our temp dir
            for pid in self._leftover_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        shutil.rmtree(self.temp, ignore_errors=True)
