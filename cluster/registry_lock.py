"""The per-name lock that makes publishes (and gc) of one registry model take turns.

The lock is a file, `registry/<name>/.publish.lock`, naming its owner (host, process id, a random
token) and when it was taken. While it is held a thread refreshes its modification time, so a lock
not refreshed for `stale_s` seconds belongs to a publish that crashed or hangs, and a lock whose
owner is a process of this host (and PID namespace) that has exited is stale at once. A waiter
breaks a stale lock and takes it; one that cannot take the lock within `wait_s` seconds fails with a
RegistryError naming the holder.

Local disk: the file is created with O_CREAT | O_EXCL, which exactly one process wins (on NFS v3+
too). A stale lock is broken by renaming it aside and checking it is the one judged stale: a lock
taken meanwhile by another waiter is put back with a link, which never overwrites.

Object stores: pyarrow's filesystems offer no conditional write (S3's If-None-Match cannot be sent
through them), so the lock is the same file written with a plain PUT: a taker checks that there is
no lock, writes its own, waits `settle_s` and reads it back, and holds the lock only if its own
token is still there (the last writer wins; the others see they lost). This does NOT guarantee
mutual exclusion when a taker stalls for longer than `settle_s` between its check and its write (a
long pause of the process, a very slow request), nor on a store without read-after-write
consistency (S3 has it; some S3-compatible stores do not); breaking a stale lock (read, compare,
delete) and refreshing one have the same window. Before moving the pointer a publish checks that it
still holds the lock, which narrows what such a race can do to the moment of that check.

Defaults, each overridden by its environment variable: wait_s 600 (RAYLM_REGISTRY_LOCK_WAIT_S),
stale_s 120 (RAYLM_REGISTRY_LOCK_STALE_S), settle_s 1 (RAYLM_REGISTRY_LOCK_SETTLE_S).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from cluster import storage
from cluster.registry_versions import RegistryError

log = logging.getLogger("raylm.registry")

WAIT_ENV, STALE_ENV = "RAYLM_REGISTRY_LOCK_WAIT_S", "RAYLM_REGISTRY_LOCK_STALE_S"
SETTLE_ENV = "RAYLM_REGISTRY_LOCK_SETTLE_S"
DEFAULT_WAIT_S = 600.0  # a publish copies a whole model: the one before may take minutes
DEFAULT_STALE_S = 120.0
DEFAULT_SETTLE_S = 1.0  # object stores: far above a PUT's latency (tens of ms on S3)
POLL_S = 0.2


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = -1.0
    if value <= 0:
        raise RegistryError(f"{env}='{raw}' is not a positive number of seconds")
    return value


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


class NameLock:
    """The lock file at `path`, held by `with NameLock(...)`; `what` names the model in messages."""

    def __init__(self, path: str, what: str, wait_s: float | None = None, stale_s: float | None = None,
                 settle_s: float | None = None):
        self.path, self.what = path, what
        self.wait_s = _seconds(WAIT_ENV, DEFAULT_WAIT_S) if wait_s is None else wait_s
        self.stale_s = _seconds(STALE_ENV, DEFAULT_STALE_S) if stale_s is None else stale_s
        self.settle_s = _seconds(SETTLE_ENV, DEFAULT_SETTLE_S) if settle_s is None else settle_s
        self.local = not storage.is_uri(path)
        self.token = uuid.uuid4().hex
        self.body = json.dumps({"host": socket.gethostname(), "pid_namespace": _pid_namespace(), "pid": os.getpid(),
                                "token": self.token, "taken": time.time()}).encode()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def __enter__(self) -> NameLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = time.monotonic() + self.wait_s
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while not self._take():
            holder = self.holder()
            if holder is None:
                continue  # released between our try and our look: try again at once
            if self.is_stale(holder):
                self._break(holder)
                continue
            if time.monotonic() >= deadline:
                raise RegistryError(
                    f"{self.what} is locked by another publish or gc ({describe(holder)}; lock file '{self.path}'), "
                    f"still held after {self.wait_s:g} s of waiting; retry when it has finished (a lock whose owner "
                    f"is gone goes stale after {self.stale_s:g} s, {STALE_ENV})")
            time.sleep(POLL_S)
        self._stop.clear()
        self._refresher = threading.Thread(target=self._refresh, name=f"lock {self.path}", daemon=True)
        self._refresher.start()

    def _take(self) -> bool:
        if self.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self.body)
                f.flush()
                os.fsync(f.fileno())
            return True
        if storage.exists(self.path):
            return False
        storage.write_bytes_atomic(self.path, self.body)
        time.sleep(self.settle_s)  # another taker's PUT that raced ours lands by now: the last one wins
        return self.held()

    def holder(self) -> dict[str, Any] | None:
        """The lock file's owner and `age_s` (seconds since it was taken or refreshed); None when
        there is no lock. A lock whose body is not written yet has only its age."""
        fs, p = storage.filesystem(self.path)
        info = fs.get_file_info(p)
        if info.type != pafs.FileType.File:
            return None
        try:
            data = json.loads(storage.read_text(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            data = {}
        age = time.time() - info.mtime_ns / 1e9 if info.mtime_ns else 0.0
        return {**(data if isinstance(data, dict) else {}), "age_s": age}

    def held(self) -> bool:
        holder = self.holder()
        return holder is not None and holder.get("token") == self.token

    def is_stale(self, holder: dict[str, Any]) -> bool:
        here = holder.get("host") == socket.gethostname() and holder.get("pid_namespace") == _pid_namespace()
        if here and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return True
        return holder["age_s"] > self.stale_s

    def _break(self, holder: dict[str, Any]) -> None:
        log.warning("breaking the stale lock of %s (%s; '%s')", self.what, describe(holder), self.path)
        if not self.local:
            now = self.holder()
            if now is not None and now.get("token") == holder.get("token"):
                fs, p = storage.filesystem(self.path)
                fs.delete_file(p)
            return
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another waiter broke it first
        try:
            with open(aside, encoding="utf-8") as f:
                token = json.load(f).get("token")
        except (OSError, ValueError, AttributeError):
            token = None
        if token != holder.get("token"):  # a lock taken after we judged: put it back, never over a newer one
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        os.remove(aside)

    def _refresh(self) -> None:
        while not self._stop.wait(self.stale_s / 4):
            try:
                if not self.held():
                    return  # lost (judged stale and broken): check_held says so before the pointer moves
                if self.local:
                    os.utime(self.path)
                else:
                    storage.write_bytes_atomic(self.path, self.body)
            except OSError as exc:  # a passing storage error: the lock goes stale only after stale_s
                log.warning("could not refresh the lock of %s at '%s': %s", self.what, self.path, exc)

    def check_held(self) -> None:
        """Raise unless this lock is still ours (it is lost only when judged stale and broken)."""
        if not self.held():
            raise RegistryError(f"{self.what}: lost the lock '{self.path}' (another publish or gc judged it stale: "
                                f"not refreshed for {self.stale_s:g} s, or its owner gone); nothing was made "
                                "current, publish again")

    def release(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self.held():
            fs, p = storage.filesystem(self.path)
            fs.delete_file(p)


def describe(holder: dict[str, Any]) -> str:
    """'host H, pid P, taken 12 s ago, refreshed 3 s ago' for a lock's holder."""
    taken = holder.get("taken")
    since = f", taken {time.time() - taken:.0f} s ago" if isinstance(taken, int | float) else ""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{since}, "
            f"refreshed {holder['age_s']:.0f} s ago")
