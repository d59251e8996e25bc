"""The store on SQLite and PostgreSQL: migrations at start-up (twice is a no-op), repository
round trips, bounded logs, and the tasks a killed process left behind."""
from __future__ import annotations

from datetime import timezone

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from store import logs, models, tasks, users
from store.db import Database
from store.records import ModelRecord
from store.tables import utcnow


@pytest.fixture
def db(database_url):
    d = Database(database_url)
    d.migrate()
    yield d
    d.dispose()


def test_migrations_create_the_schema_and_are_idempotent(db):
    db.migrate()  # a second start-up changes nothing
    names = set(inspect(db.engine).get_table_names())
    assert {"users", "models", "desired_states", "tasks", "model_logs", "alembic_version"} <= names
    with db.engine.connect() as conn:  # every branch's head (independent migrations all apply)
        assert {v for (v,) in conn.execute(text("SELECT version_num FROM alembic_version"))} == _heads()


def _heads() -> set[str]:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from store.db import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return set(ScriptDirectory.from_config(cfg).get_heads())


def test_sqlite_runs_in_wal_mode(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'x.db'}")
    d.migrate()
    with d.engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL


def test_users_round_trip_and_unique_names(db):
    with db.session() as s:
        users.add(s, "alice", "hash1", "user")
    with pytest.raises(IntegrityError):
        with db.session() as s:
            users.add(s, "alice", "hash2", "admin")
    with db.session() as s:
        got = users.get(s, "alice")
        assert got.role == "user" and got.password_hash == "hash1"
        assert got.created_at.tzinfo is not None and got.created_at.utcoffset() == timezone.utc.utcoffset(None)
        assert users.set_password(s, "alice", "hash3")
    assert db.call(users.get, "alice").password_hash == "hash3"
    assert db.call(users.remove, "alice") and db.call(users.get, "alice") is None


def test_models_and_desired_states(db):
    now = utcnow()
    rec = ModelRecord(id="model-1", name="m1", display_name="M 1", description="d", framework="transformers",
                      kind="causal_lm", path="/w/m1", priority=3, config={"model_path": "/w/m1", "n_ctx": 2048},
                      resource_requirements={"gpu_count": 0}, tags=["a", "b"], created_at=now, updated_at=now)
    db.call(models.add, rec)
    db.call(models.set_desired, "m1", "running")
    db.call(models.set_desired, "m1", "stopped")
    (got,) = db.call(models.list_all)
    assert got.config == {"model_path": "/w/m1", "n_ctx": 2048} and got.tags == ["a", "b"]
    assert db.call(models.desired_states) == {"m1": "stopped"}
    assert db.call(models.remove, "model-1")
    assert db.call(models.list_all) == [] and db.call(models.desired_states) == {}


def test_tasks_left_unfinished_are_failed_at_the_next_start(db):
    db.call(tasks.add, "t1", "m", "start")
    db.call(tasks.mark, "t1", "running")
    db.call(tasks.add, "t2", "m", "stop")
    db.call(tasks.mark, "t2", "succeeded")
    assert db.call(tasks.fail_unfinished, "server stopped") == 1
    t1, t2 = db.call(tasks.get, "t1"), db.call(tasks.get, "t2")
    assert (t1.status, t1.error_code) == ("failed", "INTERRUPTED") and t1.finished_at is not None
    assert t2.status == "succeeded"


def test_logs_are_bounded_per_model(db):
    db.call(logs.add_many, [("m", utcnow(), "INFO", f"line {i}") for i in range(30)])
    db.call(logs.add_many, [("other", utcnow(), "INFO", "x")])
    db.call(logs.trim, "m", 10)
    recent = db.call(logs.recent, "m", 100)
    assert [r.message for r in recent] == [f"line {i}" for i in range(20, 30)]
    assert db.call(logs.count, "other") == 1


def test_alert_rules_and_history_round_trip(db):
    from datetime import timedelta

    from store import alerts
    from store.alerts import AlertRuleRecord

    assert {"alert_rules", "alert_events"} <= set(inspect(db.engine).get_table_names())
    rec = db.call(alerts.add_rule, AlertRuleRecord(id="alert-1", name="GPU 高", condition="gpu_utilization > 90",
                                                   severity="warning", enabled=True,
                                                   notification_channels=["email", "webhook"]))
    assert rec.created_at is not None and rec.notification_channels == ["email", "webhook"]
    got = db.call(alerts.update_rule, "alert-1", {"enabled": False, "notification_channels": ["webhook"]})
    assert (got.enabled, got.notification_channels, got.name) == (False, ["webhook"], "GPU 高")
    assert db.call(alerts.update_rule, "nope", {"enabled": True}) is None
    t0 = utcnow()
    ids = [db.call(alerts.add_event, alert_id="a1", rule_id="alert-1", rule_name="GPU 高", condition="c",
                   severity="warning", state=state, subject="gpu:0", value=91.5, message="m", ts=t0 + timedelta(s))
           for s, state in enumerate(("firing", "repeat", "resolved"))]
    db.call(alerts.set_notifications, ids[0], {"webhook": {"ok": True, "attempts": 1}})
    items, total = db.call(alerts.history, rule_id="alert-1", limit=2)
    assert total == 3 and [e.state for e in items] == ["resolved", "repeat"]
    firing, _ = db.call(alerts.history, state="firing", since=t0, until=t0)
    assert firing[0].notifications == {"webhook": {"ok": True, "attempts": 1}} and firing[0].value == 91.5
    assert db.call(alerts.remove_rule, "alert-1") and db.call(alerts.list_rules) == []
    assert db.call(alerts.history, rule_id="alert-1")[1] == 3  # the history outlives the rule
