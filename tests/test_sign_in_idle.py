"""A signed-in session ends after CDS_OIDC_IDLE_TIMEOUT_S without a person's request, before its lifetime.

The session records live in the real session store (SQLite); the clock is the test's. The full sign-in
against a real provider through Chromium is tests/test_oidc_sign_in.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask import Flask

from cds_service.adapters.session_store import SqliteSessionStore
from cds_service.core.settings import Settings, SettingsError
from cds_service.web import sign_in as sign_in_module
from cds_service.web.sign_in import SignIn


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def signed_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    clock = Clock()
    monkeypatch.setattr(sign_in_module, "time", clock)
    settings = Settings(oidc_session_lifetime_s=8 * 3600, oidc_idle_timeout_s=1800, data_dir=tmp_path / "data")
    app = Flask(__name__)
    app.secret_key = "s" * 32
    flow = SignIn(settings, SqliteSessionStore(tmp_path / "sessions.sqlite3"), client=None)
    with app.test_request_context("/worklist"):
        flow.start_session("dr.grey", {"sub": "1"}, id_token="token")
        yield SimpleNamespace(flow=flow, clock=clock)


def test_a_person_s_requests_keep_the_session_and_idling_ends_it(signed_in):
    flow, clock = signed_in.flow, signed_in.clock
    for _ in range(5):  # a page every 25 minutes: 2 hours signed in
        clock.now += 25 * 60
        assert flow.current_user(active=True) == "dr.grey"
    clock.now += 1800 + 1
    assert flow.current_user(active=True) is None
    clock.now -= 1800  # and the record is gone: not back by any clock
    assert flow.current_user(active=True) is None


def test_the_worklist_s_own_refresh_does_not_keep_an_unattended_session(signed_in):
    flow, clock = signed_in.flow, signed_in.clock
    for _ in range(30):  # the open worklist refreshes itself every minute for half an hour
        clock.now += 60
        assert flow.current_user(active=False) == "dr.grey"
    clock.now += 61
    assert flow.current_user(active=False) is None


def test_the_lifetime_still_ends_an_active_session(signed_in):
    flow, clock = signed_in.flow, signed_in.clock
    for _ in range(8 * 4 - 1):
        clock.now += 15 * 60
        assert flow.current_user(active=True) == "dr.grey"
    clock.now += 15 * 60 + 1
    assert flow.current_user(active=True) is None


def test_no_idle_timeout_when_set_to_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clock = Clock()
    monkeypatch.setattr(sign_in_module, "time", clock)
    app = Flask(__name__)
    app.secret_key = "s" * 32
    flow = SignIn(Settings(oidc_idle_timeout_s=0, data_dir=tmp_path), SqliteSessionStore(tmp_path / "s.sqlite3"), client=None)
    with app.test_request_context("/worklist"):
        flow.start_session("dr.grey", {"sub": "1"}, id_token="token")
        clock.now += 4 * 3600
        assert flow.current_user(active=False) == "dr.grey"


def test_a_negative_idle_timeout_is_refused_by_name():
    with pytest.raises(SettingsError, match="CDS_OIDC_IDLE_TIMEOUT_S=-1"):
        Settings(oidc_idle_timeout_s=-1)
