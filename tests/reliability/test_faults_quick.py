"""Quick fault injection (scripts/fault_injection.py) against real servers on the tiny
checkpoints: (a) a client that leaves mid-stream frees the engine within 1 s, and (c) a model
whose weights are garbage answers 503 MODEL_LOAD_FAILED with Retry-After while the others serve."""
from __future__ import annotations

from scripts.fault_injection import fault_bad_weights, fault_disconnect


def test_disconnect_mid_stream_frees_the_engine_within_1s(tiny_models_dir):
    res = fault_disconnect(tiny_models_dir, repeats=2)
    for run in res["runs"]:
        assert run["status"] == 200 and run["chunks_read"] >= 5, run
        assert run["active_before_close"] == 1, run
        assert run["seconds_to_idle"] is not None and run["seconds_to_idle"] < 1.0, run


def test_failed_model_load_is_isolated(tiny_models_dir):
    res = fault_bad_weights(tiny_models_dir)
    for answer in res["broken_model_answers"]:
        assert answer["status"] == 503, answer
        assert answer["code"] == "MODEL_LOAD_FAILED", answer
        assert answer["retry_after"], answer
    assert res["others"] == {"qwen2_5_0_5b": 200, "rapidocr": 200, "health": 200, "readyz": 200}, res["others"]
