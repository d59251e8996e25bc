"""The event hub: fan-out by kind, bounded queues that drop the oldest, delivery from other threads."""
import asyncio
import threading

import pytest

from management.events import ALERT, MODEL_STATUS, SAMPLE, EventHub


def test_fan_out_by_kind_and_bounded_queue_drops_oldest():
    asyncio.run(_fan_out())


async def _fan_out():
    hub = EventHub()
    hub.bind(asyncio.get_running_loop())
    everything = hub.subscribe()
    alerts = hub.subscribe([ALERT], maxsize=2)
    for i in range(3):
        hub.publish(ALERT, {"n": i})
    hub.publish(MODEL_STATUS, {"model_id": "m"})
    assert alerts.take_dropped() == 1
    assert [(await alerts.get()).data["n"] for _ in range(2)] == [1, 2]
    got = [(await everything.get()).kind for _ in range(4)]
    assert got == [ALERT, ALERT, ALERT, MODEL_STATUS]
    alerts.close()
    assert hub.subscribers == 1
    with pytest.raises(ValueError):
        hub.publish("nonsense", {})


def test_publish_from_a_worker_thread_is_delivered_on_the_loop():
    asyncio.run(_from_thread())


async def _from_thread():
    hub = EventHub()
    hub.bind(asyncio.get_running_loop())
    sub = hub.subscribe([SAMPLE])
    t = threading.Thread(target=hub.publish, args=(SAMPLE, "x"))
    t.start()
    t.join()
    event = await asyncio.wait_for(sub.get(), 2)
    assert event.data == "x"
