"""The database job store on SQLite and PostgreSQL: records, pages and uploads round-trip; a finished
job is final; two stores (two replicas) on one database share jobs, and leases hand them over."""
from __future__ import annotations

import time

import pytest

from jobs.store import DbJobStore, Job
from store.db import Database


@pytest.fixture
def db(database_url):
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def store_on(db: Database, lease_s: float = 30, worker: str | None = None) -> DbJobStore:
    store = DbJobStore(lease_s, worker)
    store.bind(db)
    return store


def page(i: int, text: str) -> dict:
    return {"page": i, "text": text, "blocks": [{"text": text, "box": [0, 0, 1, 1]}], "image_size": [1, 1]}


def test_round_trip_and_delete(db):
    store = store_on(db)
    assert store.all() == []
    job = Job(id="abc123", owner=None, client="addr:127.0.0.1", pages_total=2, params={"pages": [0, 1]},
              filename="doc.pdf", model="rapidocr", callback_url="http://127.0.0.1:9/x")
    store.create(job, b"%PDF-1.4 \x00\xff")
    assert store.get("abc123") == job and store.upload("abc123") == b"%PDF-1.4 \x00\xff"
    store.save_page("abc123", 1, page(1, "b"))
    store.save_page("abc123", 0, page(0, "a"))
    store.save_page("abc123", 0, page(0, "a2"))  # a resumed page overwrites, never duplicates
    assert [p["text"] for p in store.pages("abc123")] == ["a2", "b"]
    assert [p["text"] for p in store.pages("abc123", skip={0})] == ["b"]
    job.status, job.pages_done = "running", 2
    assert store.save(job) and store.get("abc123").pages_done == 2
    job.status = "succeeded"
    assert store.save(job)
    store.drop_upload("abc123")
    assert store.get("abc123").status == "succeeded" and store.upload("abc123") is None
    assert [j.id for j in store.all()] == ["abc123"] and store.unfinished() == []
    store.delete("abc123")
    assert store.get("abc123") is None and store.all() == [] and store.pages("abc123") == []


def test_unknown_ids_are_none(db):
    store = store_on(db)
    for bad in ("../x", "a/b", "", "..", "x" * 100):
        assert store.get(bad) is None and store.upload(bad) is None and store.pages(bad) == []


def test_a_finished_job_is_final(db):
    """A cancel through one replica is not overwritten by the progress the running replica saves."""
    store = store_on(db)
    job = Job(id="j1", owner=None, client="c", pages_total=3)
    store.create(job, b"x")
    cancelled = Job(**{**job.__dict__, "status": "cancelled", "finished": time.time()})
    assert store.save(cancelled)
    job.status, job.pages_done = "running", 1
    assert not store.save(job)
    assert store.get("j1").status == "cancelled" and store.get("j1").pages_done == 0


def test_two_replicas_share_jobs_and_leases_hand_them_over(db):
    one, two = store_on(db, lease_s=0.5, worker="one"), store_on(db, lease_s=0.5, worker="two")
    job = Job(id="shared", owner="key1", client="key:key1", pages_total=1)
    one.create(job, b"doc")
    assert two.get("shared") == job and [j.id for j in two.unfinished()] == ["shared"]
    assert one.holds("shared") and not two.holds("shared")
    assert two.claim() == []  # held by a live lease
    time.sleep(0.6)
    assert one.renew() == 1 and two.claim() == []  # renewed in time: still one's
    time.sleep(0.6)  # one stopped renewing (it died): two takes the job over
    assert two.claim() == ["shared"] and two.holds("shared") and not one.holds("shared")
    assert one.claim() == []
    assert two.release() == 1 and one.claim() == ["shared"]  # a clean stop hands over at once
    finished = Job(**{**job.__dict__, "status": "succeeded", "finished": 100.0})
    assert one.save(finished)
    assert one.claim() == [] and two.claim() == [] and one.renew() == 0
    assert two.finished_before(101.0) == ["shared"] and two.finished_before(99.0) == []
