"""What every entry point shares: parse `--config/--set`, print the resolved config, connect to
Ray, run, write summary.json and print its path as the last line. Known bad input exits non-zero
with one clear message instead of a traceback."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from cluster.config import ConfigError, Section, load_config
from cluster.errors import JobError

T = TypeVar("T", bound=Section)
log = logging.getLogger("raylm")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    # The description is the job's docstring, usage lines included: keep its line breaks.
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML config file (see configs/)")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=3e-4 (repeatable)",
    )
    return p


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("RAYLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for name in RAY_DATA_ERROR_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorTraceFilter) for f in logger.filters):
            logger.addFilter(UserErrorTraceFilter())


# The Ray Data loggers that report an exception raised in a task before it reaches the driver.
RAY_DATA_ERROR_LOGGERS = ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions")


class UserErrorTraceFilter(logging.Filter):
    """Drops Ray Data's report of an error raylm raised on purpose in a task (a corrupt line, a
    missing column). Ray Data (2.60) logs it as a failure of its own ("Exception occurred in Ray Data
    or Ray Core internal code", "please open an issue") with a ~170-line traceback, and then the job
    prints its one line naming the file and line. Records about any other exception are kept."""

    def filter(self, record: logging.LogRecord) -> bool:
        # the exception the record carries, else the one being handled where it was logged
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not isinstance(exc, user_errors())


def follow_replaced_cwd(interval_s: float = 0.2) -> threading.Thread | None:
    """Keep this process in its starting directory when something replaces that directory.

    `ray job submit --working-dir` starts the driver inside the unpacked package, and Ray (2.60)
    unpacks it again, rmtree first, when it sets the same package up for the job's own workers on
    that node. The driver is then left in a deleted directory: os.getcwd() fails from there on,
    and transformers calls it when first imported (the prepare job's tokenizer stage failed so on
    the local multi-node cluster). A daemon thread re-enters the path once it names a new
    directory; files and imports by absolute path were never affected."""
    try:
        start = os.getcwd()
        inode = os.stat(start).st_ino
    except OSError:
        return None

    def follow() -> None:
        nonlocal inode
        while True:
            time.sleep(interval_s)
            try:
                current = os.stat(start).st_ino
            except OSError:  # between rmtree and unpack: try again next time
                continue
            if current != inode:
                os.chdir(start)
                inode = current
                log.debug("working directory %s was replaced; re-entered it", start)

    thread = threading.Thread(target=follow, name="raylm-follow-cwd", daemon=True)
    thread.start()
    return thread


def user_errors() -> tuple[type[BaseException], ...]:
    from cluster.errors import CorpusError

    return (ConfigError, JobError, CorpusError, FileNotFoundError, PermissionError)


def run_job(
    module: str,
    config_cls: type[T],
    argv: list[str] | None,
    run: Callable[[T], str],
    description: str,
    extra_args: Callable[[argparse.ArgumentParser], None] | None = None,
    config_from_args: Callable[[argparse.Namespace], dict[str, Any]] | None = None,
) -> int:
    """Parse, build the config, call `run(config) -> summary path`, print it last. `module` is the
    job's module (`jobs.pretrain`, `tune.sweep`), as the user runs it with `python -m`."""
    name = module.rsplit(".", 1)[-1]
    p = parser(f"python -m {module}", description)
    if extra_args:
        extra_args(p)
    args = p.parse_args(argv)
    setup_logging()
    follow_replaced_cwd()
    try:
        sets = list(args.set)
        if config_from_args:
            sets = [f"{k}={v}" for k, v in config_from_args(args).items()] + sets
        cfg = load_config(config_cls, args.config, sets)
        print(f"# resolved config ({name})\n{cfg.to_yaml()}", flush=True)
        summary_path = run(cfg)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2 if isinstance(exc, ConfigError) else 1
    print(summary_path, flush=True)
    return 0
