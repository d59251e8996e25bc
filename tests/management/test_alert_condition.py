"""The alert condition grammar: what it accepts, and where it says a bad condition fails."""
import pytest

from management.alerts.condition import METRICS, Condition, ConditionError, parse


@pytest.mark.parametrize("text, want", [
    ("gpu_utilization > 90 for 5m", Condition("gpu_utilization", ">", 90, 300)),
    ("cpu_percent>=0", Condition("cpu_percent", ">=", 0)),
    ("  model_error == 1  ", Condition("model_error", "==", 1)),
    ("error_rate > 0.05 for 30s", Condition("error_rate", ">", 0.05, 30)),
    ("queue_depth != -1 for 1h", Condition("queue_depth", "!=", -1, 3600)),
    ("response_time <= 2.5", Condition("response_time", "<=", 2.5)),
    ("disk_percent < 10", Condition("disk_percent", "<", 10)),
])
def test_valid_conditions(text, want):
    assert parse(text) == want


@pytest.mark.parametrize("text, position, words", [
    ("", 1, "metric"),
    ("cpu > 3", 1, "unknown metric"),
    ("cpu_percent => 3", 13, "unexpected character"),
    ("cpu_percent > abc", 15, "number"),
    ("cpu_percent 90", 13, "comparison"),
    ("cpu_percent > 9 for", 20, "duration"),
    ("cpu_percent > 9 for 5d", 21, "not a number or a duration"),
    ("cpu_percent > 1e5", 15, "not a number"),
    ("cpu_percent > 9 and memory_percent > 3", 17, "'for <duration>' or the end"),
    ("cpu_percent > 9; __import__('os')", 16, "unexpected character"),
    ("cpu_percent > 9 for 8d", 21, "not a number"),
    ("cpu_percent > 9 for 999h", 21, "between 1s and 7 days"),
    ("cpu_percent > 9 for 0s", 21, "between"),
    ("x" * 201, 201, "at most 200"),
])
def test_bad_conditions_name_the_position(text, position, words):
    with pytest.raises(ConditionError) as info:
        parse(text)
    assert info.value.position == position and words in str(info.value), str(info.value)


def test_every_documented_metric_parses_and_has_a_scope():
    for metric in METRICS:
        assert parse(f"{metric} > 1").scope in ("system", "gpu", "model")
