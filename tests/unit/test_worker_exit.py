"""A Ray worker SIGTERMed at the end of a run (its placement group removed) can get Ray's SystemExit
inside a finalizer, and Python prints it as "Exception ignored in ... Traceback" on the job's
console (a demo sweep printed one from a trial that had finished). `quiet_exit_on_sigterm` leaves
that one unprinted and every other unraisable exception as Python prints it."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO

SCRIPT = """
import gc, sys
{setup}
class Finalized:
    def __del__(self):
        raise {exc}
Finalized()
gc.collect()
print("still running", flush=True)
"""


def _run(exc: str, quiet: bool) -> subprocess.CompletedProcess:
    setup = "from cluster.train.session import quiet_exit_on_sigterm; quiet_exit_on_sigterm()" if quiet else ""
    return subprocess.run([sys.executable, "-c", SCRIPT.format(setup=setup, exc=exc)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_python_prints_a_system_exit_raised_in_a_finalizer():
    proc = _run("SystemExit(1)", quiet=False)  # what Ray's SIGTERM handler does when it lands in one
    assert "Exception ignored in" in proc.stderr and "Traceback" in proc.stderr


def test_a_system_exit_in_a_finalizer_is_left_unprinted():
    proc = _run("SystemExit(1)", quiet=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "still running\n", "")


def test_other_exceptions_in_finalizers_are_still_printed():
    proc = _run("ValueError('a real bug')", quiet=True)
    assert "Exception ignored in" in proc.stderr and "ValueError: a real bug" in proc.stderr


def test_installing_twice_keeps_one_hook():
    from cluster.train import session

    before = sys.unraisablehook
    try:
        session.quiet_exit_on_sigterm()
        installed = sys.unraisablehook
        session.quiet_exit_on_sigterm()
        assert sys.unraisablehook is installed and installed is not before
    finally:
        sys.unraisablehook = before
