"""A local multi-node Ray cluster for the drills (cluster.ops.local), driven the way a user drives
a real one: `ray job submit` through the authenticated dashboard, plus what an operator does to a
node: kill all its processes, start a replacement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import psutil

from bench.drills.common import REPO
from cluster.ops import local, local_nodes, local_state


@dataclass
class DrillCluster:
    state_file: str
    storage: str
    env: dict[str, str] = field(default_factory=dict)  # a client shell's environment

    @classmethod
    def up(cls, workers: int = 2, cpus_per_node: int = 2) -> DrillCluster:
        base = tempfile.mkdtemp(prefix="raylm-drill-")
        os.environ[local_state.STATE_ENV] = os.path.join(base, "local-cluster.json")
        os.environ["RAY_AUTH_TOKEN_PATH"] = os.path.join(base, "auth_token")
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            os.environ.pop(key, None)
        rc = local.main(["up", "--local", "--workers", str(workers), "--cpus-per-node", str(cpus_per_node)])
        if rc:
            raise RuntimeError("raylm cluster up --local failed (see stderr)")
        c = cls(state_file=os.environ[local_state.STATE_ENV], storage=os.path.join(base, "storage"))
        c.env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, **c.state().client_env()}
        c.env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), c.env.get("PATH", "")])
        return c

    def state(self) -> local_state.ClusterState:
        return local_state.load_state(local_state.state_path(self.state_file))

    def down(self) -> None:
        local.main(["down", "--state-file", self.state_file, "--grace-period", "5"])

    # -- jobs
    def submit(self, entrypoint: list[str], name: str) -> str:
        """`ray job submit --no-wait`; returns the submission id."""
        sid = f"{name}-{uuid.uuid4().hex[:6]}"
        runtime_env = json.dumps({"env_vars": {"RAYLM_STORAGE": self.storage, "RAYLM_LOG_LEVEL": "INFO"}})
        cmd = [ray_cli(), "job", "submit", "--address", self.env["RAY_API_SERVER_ADDRESS"], "--submission-id", sid,
               "--working-dir", ".", "--runtime-env-json", runtime_env, "--no-wait", "--", *entrypoint]
        out = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=180)
        if out.returncode:
            raise RuntimeError(f"ray job submit failed: {out.stderr[-2000:]}")
        return sid

    def job(self, verb: str, sid: str, timeout: float = 60) -> str:
        cmd = [ray_cli(), "job", verb, "--address", self.env["RAY_API_SERVER_ADDRESS"], sid]
        return subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout).stdout

    def ended(self, sid: str) -> str | None:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or None while it runs."""
        status = self.job("status", sid).lower()  # "Job 'x' succeeded" / "failed" / "was stopped"
        for final in ("succeeded", "failed", "stopped"):
            if f"' {final}" in status or f"' was {final}" in status:
                return final.upper()
        return None

    def wait(self, sid: str, timeout: float = 600) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or TIMEOUT after stopping it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if final := self.ended(sid):
                return final
            time.sleep(2)
        self.job("stop", sid)
        return "TIMEOUT"

    # -- nodes
    def kill_node(self, name: str) -> int:
        """SIGKILL every process of node `name` (raylet, its workers): what a crashed machine looks like."""
        state = self.state()
        node = next(n for n in state.nodes if n.name == name)
        procs = local_state.session_processes(node, state.started_at)
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass  # already gone
        psutil.wait_procs(procs, timeout=10)
        return len(procs)

    def add_node(self, name: str, cpus: int = 2) -> None:
        """A replacement worker node, as an autoscaler would start one."""
        path = local_state.state_path(self.state_file)
        state = self.state()
        auth_env, _ = local.ensure_token()
        options = {"--address": state.gcs_address, "--object-store-memory": str(512 * 2**20),
                   "--include-log-monitor": "false"}
        resources = {f"raylm_{name.replace('-', '_')}": 1.0}
        local_nodes.start_node(name, cpus, resources, options, local_nodes.node_env(auth_env), state,
                               lambda: local_state.save_state(path, state))
        local_state.save_state(path, state)


def ray_cli() -> str:
    return os.path.join(os.path.dirname(sys.executable), "ray")


def python() -> str:
    return sys.executable
