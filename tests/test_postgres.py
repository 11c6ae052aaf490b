"""A study shared through a real PostgreSQL server, started for these tests (initdb + pg_ctl)."""
from __future__ import annotations

import importlib.util
import secrets
from urllib.parse import quote

import pgserver
import pytest
import study_workers as sw
from optuna.trial import TrialState

from updp.core.errors import UpdpError
from updp.search import study as st

BINDIR = pgserver.find_bindir()
PASSWORD = f"pw-{secrets.token_hex(8)}"
pytestmark = [pytest.mark.postgres,
              pytest.mark.skipif(BINDIR is None, reason="no PostgreSQL server binaries (initdb, pg_ctl) found: "
                                 "apt-get install postgresql, or set PG_BINDIR")]


@pytest.fixture(scope="module")
def server():
    if importlib.util.find_spec("psycopg2") is None:
        pytest.fail("the PostgreSQL driver is not installed: pip install -e '.[postgres]'")
    with pgserver.pg_server(BINDIR, password=PASSWORD) as url:
        yield url


@pytest.fixture
def database(server, request):
    """A new, empty database for the test."""
    return pgserver.create_database(server, f"t_{request.node.name.lower()[:40]}_{secrets.token_hex(3)}"
                                    .replace("[", "_").replace("]", "_").replace("-", "_"))


def test_workers_opening_a_new_postgres_study_at_once_all_succeed(server, tmp_path):
    name = f"first_{secrets.token_hex(3)}"
    urls = [pgserver.create_database(server, f"{name}_{k}") for k in range(3)]
    assert sw.open_all_at_once(urls[0].replace(f"{name}_0", f"{name}_{{k}}"), tmp_path, n=6, rounds=3) == [0] * 6
    assert st.open_study(st.open_storage(urls[2], tmp_path), "first", None).trials == []


def test_killed_workers_lose_no_trial_and_retry_each_once(database, tmp_path):
    sw.run(database, tmp_path, workers=4, kills=2, target=24, sleep_s=0.2)
    study = st.open_study(st.open_storage(database, tmp_path), sw.STUDY, None)
    counts = sw.check(study, 24, workers=4, kills=2)
    assert counts["fail"] == 2
    assert len({t.user_attrs["worker"] for t in study.trials if t.state == TrialState.COMPLETE}) >= 4


def test_password_from_the_environment_opens_the_server_and_never_shows(database, tmp_path, monkeypatch):
    monkeypatch.setenv("UPDP_TEST_PGPASSWORD", PASSWORD)
    templated = database.replace(f":{quote(PASSWORD, safe='')}@", ":${UPDP_TEST_PGPASSWORD}@")
    assert "${UPDP_TEST_PGPASSWORD}" in templated and st.redact_url(templated) == templated
    st.open_study(st.open_storage(templated, tmp_path), "s", None)
    monkeypatch.setenv("UPDP_TEST_PGPASSWORD", "wrong-" + PASSWORD)
    with pytest.raises(UpdpError, match="password authentication failed") as e:
        st.open_storage(templated, tmp_path)
    assert PASSWORD not in str(e.value) and ":***@" in str(e.value)
