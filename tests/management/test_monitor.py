"""Monitoring parts in-process: the NVML reader's shape on a fake device (and no driver), the request
recorder's bounded buffer, the sampler's rows and its published sample, pruning, the live
configuration's store and event, the manager's limit on loaded models and the health probe.
The database is a real SQLite file; models are the fake adapter."""
from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from core.config import AlertThresholds
from core.errors import InsufficientResources, InvalidParameter
from core.request_context import RequestContext
from core.types import CancelToken
from management.events import CONFIG, SAMPLE, EventHub, Sample
from management.monitor import health as health_mod
from management.monitor.gpu import NvmlReader
from management.monitor.health import HealthProber
from management.monitor.host import HostReader
from management.monitor.live_config import LiveConfig
from management.monitor.recorder import RequestRecorder
from management.monitor.sampler import Sampler
from models.manager import ModelManager
from models.registry import ModelRegistry
from server.routers.management.system_schemas import GpuOut
from store import monitoring as repo
from store import rollup
from store.db import Database
from tests.conftest import fake_settings

SEED_GPU_KEYS = {"id", "name", "driver_version", "cuda_version", "utilization", "memory_used", "memory_total",
                 "memory_free", "temperature", "power_usage", "power_limit", "processes"}


class FakeNvml:
    """The functions of pynvml the reader calls, for one device that does not report its temperature."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlSystemGetDriverVersion(self):
        return b"535.86.10"

    def nvmlSystemGetCudaDriverVersion(self):
        return 12020

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("handle", i)

    def nvmlDeviceGetName(self, h):
        return "NVIDIA RTX 4090"

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=12288 * 2**20, total=24576 * 2**20, free=12288 * 2**20)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=78, memory=40)

    def nvmlDeviceGetTemperature(self, h, sensor):
        raise RuntimeError("NVMLError_NotSupported")

    def nvmlDeviceGetPowerUsage(self, h):
        return 350_000  # mW

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        return 450_000

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        return [SimpleNamespace(pid=os.getpid(), usedGpuMemory=8192 * 2**20)]


def test_nvml_reader_gives_the_seed_shape_on_a_fake_device():
    nvml = FakeNvml()
    reader = NvmlReader(nvml)
    devices = reader.read()
    reader.read()
    assert nvml.inits == 1 and len(devices) == 1
    out = GpuOut(**asdict(devices[0])).model_dump()
    assert set(out) == SEED_GPU_KEYS
    assert (out["name"], out["driver_version"], out["cuda_version"]) == ("NVIDIA RTX 4090", "535.86.10", "12.2")
    assert (out["utilization"], out["memory_used"], out["memory_total"], out["memory_free"]) == (78, 12288, 24576, 12288)
    assert (out["temperature"], out["power_usage"], out["power_limit"]) == (None, 350, 450)
    assert out["processes"][0]["memory_usage"] == 8192 and out["processes"][0]["name"]  # this test's own process


def test_no_driver_is_no_gpu_and_fast():
    class NoDriver:
        calls = 0

        def nvmlInit(self):
            NoDriver.calls += 1
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    reader = NvmlReader(NoDriver())
    assert reader.read() == [] and not reader.available
    started = time.perf_counter()
    assert reader.read() == []
    assert time.perf_counter() - started < 0.001 and NoDriver.calls == 1


@pytest.fixture
def db(tmp_path):
    database = Database(f"sqlite:///{tmp_path / 'm.db'}")
    database.migrate()
    yield database
    database.dispose()


def _ctx(model, tokens=None, started_ago=0.05):
    ctx = RequestContext(route="/v1/chat/completions", method="POST", started=time.monotonic() - started_ago)
    ctx.model = model
    ctx.completion_tokens = tokens
    return ctx


def test_recorder_buffer_is_bounded_and_written_in_batches(db):
    async def main():
        rec = RequestRecorder(max_pending=3)
        rec.db = db
        for i in range(5):
            rec.record(_ctx("m", i), 200 if i else 500)
        assert rec.dropped == 2
        assert await rec.flush() == 3
        figures = rec.take_interval()["m"]
        assert (figures.requests, figures.errors, figures.completion_tokens) == (5, 1, 10)
        assert rec.take_interval() == {}

    asyncio.run(main())
    rows = db.call(repo.recent_requests, 10)
    assert [r.completion_tokens for r in rows] == [4, 3, 2]  # the newest three; the oldest were dropped


def test_sampler_writes_rows_publishes_the_sample_and_prunes(db, tmp_path):
    async def main():
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        sub = hub.subscribe([SAMPLE])
        rec = RequestRecorder()
        models = {"busy": ("running", 3), "idle": ("stopped", 0)}
        sampler = Sampler(host=HostReader(tmp_path), gpus=NvmlReader(FakeNvml()), recorder=rec, hub=hub,
                          models=lambda: models, interval_s=1, retention_days=1)
        sampler.db = db
        await sampler.sample_once()          # the first sample: both models get a row (status first seen)
        rec.record(_ctx("busy", 20, started_ago=0.5), 200)
        rec.record(_ctx("busy", None), 503)
        sample = await sampler.sample_once()  # "idle" is unchanged and had no requests: no row
        first, second = (await sub.get()).data, (await sub.get()).data
        assert isinstance(first, Sample) and second is sample
        busy = sample.models["busy"]
        assert (busy.requests, busy.errors, busy.queue_depth, busy.status) == (2, 1, 3, "running")
        assert busy.avg_latency_s == pytest.approx(0.5, abs=0.2) and busy.tokens_per_second > 0
        assert sample.models["idle"].requests == 0 and sample.gpus[0].utilization == 78
        assert 0 <= sample.system.cpu_percent <= 100 and sample.system.disk_percent > 0
        assert db.call(repo.counts) == {"monitor_system": 2, "monitor_gpu": 2, "monitor_model": 3,
                                        "request_records": 0}
        hours = db.call(lambda s: rollup.system_summary(s, 0, 2**40))
        assert hours["samples"] == 2 and hours["max_cpu_percent"] == max(first.system.cpu_percent,
                                                                         sample.system.cpu_percent)
        assert await sampler.prune(now=time.time() + 2 * 86400) >= 7  # the rows, and their hourly rollups
        assert db.call(repo.counts)["monitor_system"] == 0
        assert db.call(lambda s: rollup.system_summary(s, 0, 2**40))["samples"] == 0

    asyncio.run(main())


def test_live_config_stores_applies_and_announces(db, tmp_path):
    settings = fake_settings(tmp_path, {})

    async def main():
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        sub = hub.subscribe([CONFIG])
        live = LiveConfig(settings, hub)
        seen = []
        live.on_change("gpu_monitor_interval", seen.append)
        await asyncio.to_thread(live.load, db)
        changed = await live.update({"gpu_monitor_interval": 5, "alert_thresholds": {"cpu_percent_high": 50}}, "admin")
        assert changed == {"gpu_monitor_interval": 5,
                           "alert_thresholds": {**AlertThresholds().model_dump(), "cpu_percent_high": 50}}
        assert seen == [60, 5]
        assert (await sub.get()).data == {"changed": changed}
        assert live.alert_thresholds() == AlertThresholds(cpu_percent_high=50)
        assert await live.update({"gpu_monitor_interval": 5}, "admin") == {}  # no change, no event
        with pytest.raises(InvalidParameter):
            await live.update({"max_concurrent_models": 10_000}, "admin")
        with pytest.raises(InvalidParameter):
            await live.update({"nope": 1}, "admin")
        assert live.get("max_concurrent_models") == 0
        again = LiveConfig(settings, hub)  # a restart reads the stored change back
        await asyncio.to_thread(again.load, db)
        assert again.get("gpu_monitor_interval") == 5 and again.alert_thresholds().cpu_percent_high == 50
        assert again.sources()["gpu_monitor_interval"] == "database"

    asyncio.run(main())


def test_manager_limit_on_loaded_models(tmp_path, fake_kind):
    mgr = ModelManager(ModelRegistry(fake_settings(tmp_path, {"a": {}, "b": {}, "c": {}})), max_loaded=2)

    async def main():
        await mgr.ensure_loaded("a")
        await mgr.ensure_loaded("b")
        await mgr.ensure_loaded("c")  # "a", least recently used, makes room
        assert sorted(mgr.loaded_ids()) == ["b", "c"]
        mgr.state("b").pinned = mgr.state("c").pinned = True  # started by the operator: never evicted
        with pytest.raises(InsufficientResources):
            await mgr.ensure_loaded("a")
        mgr.max_loaded = 0
        await mgr.ensure_loaded("a")
        assert sorted(mgr.loaded_ids()) == ["a", "b", "c"]
        await mgr.shutdown()

    asyncio.run(main())


def test_health_probe_sees_a_stuck_worker(tmp_path, fake_kind, monkeypatch):
    monkeypatch.setattr(health_mod, "PROBE_TIMEOUT_S", 0.3)
    mgr = ModelManager(ModelRegistry(fake_settings(tmp_path, {"a": {}})))

    async def main():
        hub = EventHub()
        hub.bind(asyncio.get_running_loop())
        changes = []
        prober = HealthProber(mgr, hub, interval_s=60, on_change=lambda *a: changes.append(a))
        await mgr.ensure_loaded("a")
        assert await prober.probe("a") == ("healthy", None)
        release = threading.Event()
        cancel = CancelToken()
        stuck = asyncio.ensure_future(mgr.state("a").runner.run(release.wait, cancel=cancel))
        await asyncio.sleep(0.05)
        health, reason = await prober.probe("a")
        assert health == "unhealthy" and "did not answer" in reason
        release.set()
        await stuck
        assert await prober.probe("a") == ("healthy", None)
        assert [c[1] for c in changes] == ["unhealthy", "healthy"]
        await mgr.shutdown()

    asyncio.run(main())
