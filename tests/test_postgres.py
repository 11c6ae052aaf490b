"""A study shared through a real PostgreSQL server, started for these tests (initdb + pg_ctl).

Without a server (no binaries, no driver, or it does not start) the tests skip, saying why; with
``UPDP_REQUIRE_POSTGRES=1`` (as ``.ci/run`` sets it) they fail instead, so CI cannot pass without them.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import secrets
from typing import NoReturn
from urllib.parse import quote

import pgserver
import pytest
import study_workers as sw
from optuna.trial import TrialState

from updp.core.errors import UpdpError
from updp.search import study as st

PASSWORD = f"pw-{secrets.token_hex(8)}"
REQUIRE = "UPDP_REQUIRE_POSTGRES"


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail where a server is required (``UPDP_REQUIRE_POSTGRES`` set and not 0)."""
    if os.environ.get(REQUIRE, "0") not in ("", "0"):
        pytest.fail(f"{REQUIRE} is set, but {reason}", pytrace=False)
    pytest.skip(reason)


def start_server(stack: contextlib.ExitStack) -> str:
    """The URL of a throwaway server that ``stack`` stops; :func:`unavailable` when there can be none."""
    bindir = pgserver.find_bindir()
    if bindir is None:
        unavailable("no PostgreSQL server binaries (initdb, pg_ctl) found: apt-get install postgresql, "
                    "or set PG_BINDIR")
    if importlib.util.find_spec("psycopg2") is None:
        unavailable("the PostgreSQL driver is not installed: pip install -e '.[postgres]'")
    try:
        return stack.enter_context(pgserver.pg_server(bindir, password=PASSWORD))
    except (RuntimeError, OSError) as e:
        unavailable(f"the PostgreSQL server in {bindir} did not start: {str(e).strip()[:500]}")


@pytest.fixture(scope="module")
def server():
    with contextlib.ExitStack() as stack:
        yield start_server(stack)


@pytest.fixture
def database(server, request):
    """A new, empty database for the test."""
    return pgserver.create_database(server, f"t_{request.node.name.lower()[:40]}_{secrets.token_hex(3)}"
                                    .replace("[", "_").replace("]", "_").replace("-", "_"))


@pytest.mark.parametrize("required", [False, True])
def test_no_server_skips_with_the_reason_or_fails_where_one_is_required(tmp_path, monkeypatch, required):
    for tool in ("initdb", "pg_ctl"):  # binaries that cannot start a server
        (tmp_path / tool).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / tool).chmod(0o755)
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))
    monkeypatch.setenv(REQUIRE, "1" if required else "0")
    with pytest.raises(pytest.fail.Exception if required else pytest.skip.Exception) as e:
        with contextlib.ExitStack() as stack:
            start_server(stack)
    assert f"server in {tmp_path} did not start" in str(e.value)
    assert (REQUIRE in str(e.value)) == required


@pytest.mark.postgres
def test_workers_opening_a_new_postgres_study_at_once_all_succeed(server, tmp_path):
    name = f"first_{secrets.token_hex(3)}"
    urls = [pgserver.create_database(server, f"{name}_{k}") for k in range(3)]
    assert sw.open_all_at_once(urls[0].replace(f"{name}_0", f"{name}_{{k}}"), tmp_path, n=6, rounds=3) == [0] * 6
    assert st.open_study(st.open_storage(urls[2], tmp_path), "first", None).trials == []


@pytest.mark.postgres
def test_killed_workers_lose_no_trial_and_retry_each_once(database, tmp_path):
    sw.run(database, tmp_path, workers=4, kills=2, target=24, sleep_s=0.2)
    study = st.open_study(st.open_storage(database, tmp_path), sw.STUDY, None)
    counts = sw.check(study, 24, workers=4, kills=2)
    assert counts["fail"] == 2
    assert len({t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}) >= 4


@pytest.mark.postgres
def test_password_from_the_environment_opens_the_server_and_never_shows(database, tmp_path, monkeypatch):
    monkeypatch.setenv("UPDP_TEST_PGPASSWORD", PASSWORD)
    templated = database.replace(f":{quote(PASSWORD, safe='')}@", ":${UPDP_TEST_PGPASSWORD}@")
    assert "${UPDP_TEST_PGPASSWORD}" in templated and st.redact_url(templated) == templated
    st.open_study(st.open_storage(templated, tmp_path), "s", None)
    monkeypatch.setenv("UPDP_TEST_PGPASSWORD", "wrong-" + PASSWORD)
    with pytest.raises(UpdpError, match="password authentication failed") as e:
        st.open_storage(templated, tmp_path)
    assert PASSWORD not in str(e.value) and ":***@" in str(e.value)


@pytest.mark.postgres
def test_heartbeat_stale_trial_on_postgres_is_failed_with_a_reason_and_retried_once(database, tmp_path):
    """The heartbeat path on the live server: a RUNNING trial of a worker on another host (no pid to check)
    whose heartbeat stops is failed, says why, and is retried once."""
    study = st.open_study(st.open_storage(database, tmp_path, heartbeat_s=1, grace_s=1), "s", None)
    failed = sw.heartbeat_goes_stale(study)
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"].startswith("no heartbeat")
    retries = [t for t in study.trials if st.retried_trial(t) == failed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.WAITING and retries[0].params == failed.params
    assert st.fail_stale_trials(study) == 0
