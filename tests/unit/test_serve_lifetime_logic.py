"""serve.lifetime's watcher without Ray: Ray going away under a running app ends it with exit 1,
and Ray stopping because the app itself is ending, or because the process shut its Ray down
itself, is no failure."""

from __future__ import annotations

import pytest

from serve import lifetime


@pytest.fixture()
def exits(monkeypatch):
    answers = iter([True, True, False])  # Ray answers twice, then no more
    monkeypatch.setattr(lifetime, "ray_alive", lambda: next(answers, False))
    monkeypatch.setattr(lifetime, "stop_haproxy", lambda port: [])
    monkeypatch.setattr(lifetime, "_ending", type(lifetime._ending)())
    codes: list[int] = []
    monkeypatch.setattr(lifetime.os, "_exit", codes.append)
    monkeypatch.setattr("ray.is_initialized", lambda: True)  # killed under us: the driver still thinks it is connected
    return codes


def test_ray_going_away_under_a_running_app_ends_it_with_exit_1(exits, capsys):
    lifetime.watch_ray(0, poll_s=0.01).join(timeout=10)
    assert exits == [1] and "Ray went away under this app" in capsys.readouterr().err


def test_ray_stopping_while_the_app_ends_on_purpose_is_no_failure(exits, capsys):
    # Regression: after SIGTERM the app's own shutdown stopped its Ray, the watcher saw Ray gone
    # and ended the process with exit 1 and an error line instead of the clean exit 0.
    lifetime._ending.set()
    lifetime.watch_ray(0, poll_s=0.01).join(timeout=10)
    assert exits == [] and "Ray went away" not in capsys.readouterr().err


def test_ray_shut_down_by_the_process_itself_is_no_failure(exits, capsys, monkeypatch):
    # Regression: a test process read `serve.app.app` (which starts the watcher) while the test
    # session's Ray was up; at the session's end its own ray.shutdown() stopped that Ray, and the
    # watcher ended pytest with exit 1 after every test had passed.
    monkeypatch.setattr("ray.is_initialized", lambda: False)
    lifetime.watch_ray(0, poll_s=0.01).join(timeout=10)
    assert exits == [] and "Ray went away" not in capsys.readouterr().err
