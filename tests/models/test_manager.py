"""The model manager against the fake adapter: lazy load, one load per model, isolation,
unload, LRU eviction under a budget and idle unload."""
from __future__ import annotations

import asyncio

import pytest

from core.errors import ModelLoadFailed, ModelNotFound, ModelNotInstalled
from core.types import CancelToken
from models.manager import ModelManager
from models.registry import ModelRegistry
from tests.conftest import fake_settings


def manager_for(tmp_path, models, **kw) -> ModelManager:
    return ModelManager(ModelRegistry(fake_settings(tmp_path, models)), **kw)


def loads(fakes, model_id):
    return [e for e in fakes.EVENTS if e == (model_id, "load")]


def test_concurrent_requests_load_once(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"a": {"load_delay": 0.2}})

    async def main():
        await asyncio.gather(*(mgr.ensure_loaded("a") for _ in range(5)))

    asyncio.run(main())
    assert len(loads(fake_kind, "a")) == 1
    assert mgr.loaded_ids() == ["a"]


def test_unknown_and_not_installed(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"a": {"installed": False}})
    with pytest.raises(ModelNotFound):
        asyncio.run(mgr.ensure_loaded("zzz"))
    with pytest.raises(ModelNotInstalled) as err:
        asyncio.run(mgr.ensure_loaded("a"))
    assert "Adding model weights" in err.value.message


def test_failed_load_is_isolated_and_clean(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"bad": {"fail_load": True}, "good": {}})

    async def main():
        with pytest.raises(ModelLoadFailed) as err:
            await mgr.ensure_loaded("bad")
        assert "/secret" not in err.value.message and "0x" not in err.value.message
        assert err.value.headers.get("Retry-After")
        with pytest.raises(ModelLoadFailed):  # within the retry window: no second load attempt
            await mgr.ensure_loaded("bad")
        await mgr.ensure_loaded("good")

    asyncio.run(main())
    assert len(loads(fake_kind, "bad")) == 1
    assert mgr.loaded_ids() == ["good"] and mgr.failed_ids() == ["bad"]


def test_unload_then_reload(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"a": {}})

    async def main():
        from PIL import Image
        from models.adapter import OcrOptions

        img = Image.new("RGB", (10, 20))
        r1 = await mgr.run("a", "ocr", img, OcrOptions(), cancel=CancelToken())
        assert await mgr.unload("a") is True
        assert mgr.state("a").adapter is None and mgr.state("a").memory_bytes == 0
        assert await mgr.unload("a") is False
        r2 = await mgr.run("a", "ocr", img, OcrOptions(), cancel=CancelToken())
        return r1, r2

    r1, r2 = asyncio.run(main())
    assert r1.text == r2.text == "a 10x20"
    assert [e for _, e in fake_kind.EVENTS if e in ("load", "unload")] == ["load", "unload", "load"]


def test_memory_budget_evicts_least_recently_used(tmp_path, fake_kind):
    # Each fake reports 4 MB once loaded and 4 MB on disk; the budget fits two.
    models = {m: {"memory_mb": 4} for m in ("a", "b", "c")}
    mgr = manager_for(tmp_path, models, memory_budget_mb=9)
    for m in models:
        (tmp_path / "weights" / m).mkdir(parents=True)
        (tmp_path / "weights" / m / "model.safetensors").write_bytes(b"\0" * 4 * 2**20)

    async def main():
        await mgr.ensure_loaded("a")
        await mgr.ensure_loaded("b")
        mgr.state("a").last_used += 100  # a used more recently than b
        await mgr.ensure_loaded("c")

    asyncio.run(main())
    assert sorted(mgr.loaded_ids()) == ["a", "c"]


def test_idle_unload(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"a": {}}, idle_unload_s=0.1, idle_check_s=0.05)

    async def main():
        await mgr.start([])
        await mgr.ensure_loaded("a")
        await asyncio.sleep(0.4)
        await mgr.shutdown()

    asyncio.run(main())
    assert ("a", "unload") in fake_kind.EVENTS


def test_cancelled_waiter_stops_the_worker(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"slow": {"delay": 5}})

    async def main():
        from PIL import Image
        from models.adapter import OcrOptions

        token = CancelToken()
        task = asyncio.create_task(mgr.run("slow", "ocr", Image.new("RGB", (5, 5)), OcrOptions(), cancel=token))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert token.cancelled
        for _ in range(100):  # the worker notices within a poll interval
            if ("slow", "cancelled") in fake_kind.EVENTS:
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert ("slow", "cancelled") in fake_kind.EVENTS


def test_a_caller_that_gives_up_does_not_cause_a_second_load(tmp_path, fake_kind):
    mgr = manager_for(tmp_path, {"a": {"load_delay": 0.3}})

    async def main():
        first = asyncio.create_task(mgr.ensure_loaded("a"))
        await asyncio.sleep(0.05)
        first.cancel()  # e.g. the client disconnected during the first load
        with pytest.raises(asyncio.CancelledError):
            await first
        await mgr.ensure_loaded("a")

    asyncio.run(main())
    assert len(loads(fake_kind, "a")) == 1 and mgr.loaded_ids() == ["a"]


def test_full_queue_is_refused_before_any_work(tmp_path, fake_kind):
    from core.errors import Overloaded

    mgr = manager_for(tmp_path, {"a": {"delay": 0.5}})

    async def main():
        from PIL import Image
        from models.adapter import OcrOptions

        await mgr.ensure_loaded("a")
        runner = mgr.state("a").runner
        runner.max_queue = 1  # concurrency 1 + 1 waiting
        img = Image.new("RGB", (5, 5))
        tasks = [asyncio.create_task(mgr.run("a", "ocr", img, OcrOptions(), cancel=CancelToken())) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as err:
            mgr.check_capacity("a")
        assert err.value.headers["Retry-After"]
        await asyncio.gather(*tasks)
        mgr.check_capacity("a")  # room again

    asyncio.run(main())
