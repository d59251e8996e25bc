"""The file job store: records, pages and uploads round-trip; ids cannot name other folders."""
from __future__ import annotations

from jobs.store import FileJobStore, Job


def test_round_trip_and_delete(tmp_path):
    store = FileJobStore(tmp_path / "jobs")
    assert store.all() == [] and not (tmp_path / "jobs").exists()  # nothing touched until the first job
    job = Job(id="abc123", owner=None, client="addr:127.0.0.1", pages_total=2, params={"pages": [0, 1]})
    store.create(job, b"%PDF-1.4 ...")
    assert store.get("abc123") == job and store.upload("abc123") == b"%PDF-1.4 ..."
    store.save_page("abc123", 1, {"page": 1, "text": "b", "blocks": [], "image_size": [1, 1]})
    store.save_page("abc123", 0, {"page": 0, "text": "a", "blocks": [], "image_size": [1, 1]})
    assert [p["text"] for p in store.pages("abc123")] == ["a", "b"]
    job.status = "succeeded"
    store.save(job)
    store.drop_upload("abc123")
    assert store.get("abc123").status == "succeeded" and store.upload("abc123") is None
    assert [j.id for j in store.all()] == ["abc123"]
    store.delete("abc123")
    assert store.get("abc123") is None and store.all() == []


def test_ids_that_are_not_plain_names_are_unknown(tmp_path):
    store = FileJobStore(tmp_path / "jobs")
    for bad in ("../x", "a/b", "", ".."):
        assert store.get(bad) is None
