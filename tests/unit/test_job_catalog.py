"""The built-in task types give exactly the results clients depend on."""

import hashlib
import random
import threading
import time

import numpy as np
import pytest

from shared.jobs import (
    InvalidPayload,
    JobCatalog,
    JobContext,
    JobError,
    JobInterrupted,
    RetryableJobError,
    UnknownTask,
    load_catalog,
)
from shared.jobs.retries import retry_delay_s
from shared.jobs.tasks.basic import SleepPayload

catalog = load_catalog()


def run(task: str, payload: dict) -> dict:
    return catalog.get(task).run(payload, JobContext())


def test_catalog_lists_every_built_in_task():
    assert catalog.names() == [
        "aggregate",
        "checksum",
        "echo",
        "fail",
        "sleep",
        "text_stats",
    ]


def test_echo_returns_the_payload_unchanged():
    payload = {"b": [1, 2.5, None, {"c": "ü"}], "a": True}

    assert run("echo", payload) == payload


def test_echo_refuses_a_payload_that_is_not_an_object():
    with pytest.raises(InvalidPayload):
        catalog.validate("echo", [1, 2])


def test_sleep_returns_the_seconds_slept_as_sent():
    assert run("sleep", {"seconds": 0.05}) == {"slept": 0.05}
    assert run("sleep", {"seconds": 1e-3}) == {"slept": 0.001}


def test_sleep_reports_progress_up_to_one():
    context = JobContext()

    catalog.get("sleep").run({"seconds": 0.05}, context)

    assert context.take_progress() == 1.0
    assert context.take_progress() is None


def test_sleep_stops_as_soon_as_the_context_is_stopped():
    context = JobContext()
    threading.Timer(0.05, context.stop, args=("cancelled",)).start()
    started = time.monotonic()

    with pytest.raises(JobInterrupted, match="cancelled"):
        catalog.get("sleep").run({"seconds": 3600}, context)
    assert time.monotonic() - started < 60


@pytest.mark.parametrize("seconds", [0, -1, 3600.5, "1", True, None])
def test_sleep_refuses_seconds_outside_zero_to_an_hour(seconds):
    with pytest.raises(InvalidPayload) as caught:
        catalog.validate("sleep", {"seconds": seconds})
    assert caught.value.errors[0]["loc"] == ["payload", "seconds"]


def test_sleep_accepts_exactly_an_hour():
    assert SleepPayload.model_validate({"seconds": 3600}).seconds == 3600


@pytest.mark.parametrize("algorithm", ["sha256", "sha512", "sha1", "md5", "blake2b"])
def test_checksum_hashes_the_utf8_bytes_with_the_algorithm(algorithm):
    data = "grüße, HelixNet 🚀"
    expected = hashlib.new(algorithm, data.encode("utf-8")).hexdigest()

    assert run("checksum", {"data": data, "algorithm": algorithm}) == {
        "algorithm": algorithm,
        "hexdigest": expected,
    }


def test_checksum_defaults_to_sha256():
    assert run("checksum", {"data": "abc"}) == {
        "algorithm": "sha256",
        "hexdigest": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
    }


def test_checksum_refuses_an_unknown_algorithm():
    with pytest.raises(InvalidPayload) as caught:
        catalog.validate("checksum", {"data": "x", "algorithm": "crc32"})
    assert caught.value.errors[0]["loc"] == ["payload", "algorithm"]


def test_text_stats_counts_lines_words_characters_and_ranks_words():
    text = "The cat and the hat.\nIt's the CAT!\r\n\nhat-trick: 42 cats"

    result = run("text_stats", {"text": text, "top": 4})

    assert result == {
        "lines": 4,
        "words": 11,
        "characters": len(text),
        "top_words": [["the", 3], ["cat", 2], ["hat", 2], ["42", 1]],
    }


def test_text_stats_breaks_ties_by_word_and_defaults_to_ten():
    text = " ".join(f"w{i:02d}" for i in range(12, 0, -1))

    result = run("text_stats", {"text": text})

    assert result["top_words"] == [[f"w{i:02d}", 1] for i in range(1, 11)]


def test_text_stats_of_empty_text_is_all_zero():
    assert run("text_stats", {"text": ""}) == {
        "lines": 0,
        "words": 0,
        "characters": 0,
        "top_words": [],
    }


def test_aggregate_gives_sample_stdev_and_linear_percentiles():
    result = run("aggregate", {"values": [4, 1, 3, 2]})

    assert result == {
        "count": 4,
        "sum": 10.0,
        "min": 1.0,
        "max": 4.0,
        "mean": 2.5,
        "stdev": pytest.approx(1.2909944487358056, abs=0),
        "percentiles": {"50": 2.5, "90": 3.7, "99": 3.9699999999999998},
    }


def test_aggregate_keys_percentiles_as_the_client_wrote_them():
    result = run("aggregate", {"values": [10, 20], "percentiles": [0, 25.0, 100, 12.5]})

    assert result["percentiles"] == {
        "0": 10.0,
        "25.0": 12.5,
        "100": 20.0,
        "12.5": 11.25,
    }


def test_aggregate_of_one_value_has_zero_stdev():
    result = run("aggregate", {"values": [7.5]})

    assert result["stdev"] == 0.0
    assert result["percentiles"] == {"50": 7.5, "90": 7.5, "99": 7.5}


def test_aggregate_percentiles_match_numpy_on_many_values():
    values = [random.Random(i).gauss(0, 1000) for i in range(10_001)]
    percentiles = [0, 1, 33.3, 50, 99.9, 100]

    result = run("aggregate", {"values": values, "percentiles": percentiles})

    expected = np.percentile(np.array(values), percentiles)
    assert list(result["percentiles"].values()) == [float(v) for v in expected]
    assert result["stdev"] == pytest.approx(float(np.std(values, ddof=1)), rel=1e-12)
    assert result["mean"] == pytest.approx(float(np.mean(values)), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # The true sum fits in a double; a plain running sum overflows on the way.
        ([1e308, 1e308, -1e308], {"sum": 1e308, "mean": 1e308 / 3}),
        # Squares of these overflow; their stdev does not.
        ([1e200, -1e200], {"sum": 0.0, "stdev": 2**0.5 * 1e200}),
        ([1e-300, 1e-300, 1e200], {"sum": 1e200, "min": 1e-300}),
        # Where nothing overflows, the sum is fsum's, exact to the last bit.
        ([1e308, -1e308, 1.1], {"sum": 1.1}),
        ([1e200, -1e200, 1e-300], {"sum": 1e-300}),
    ],
)
def test_aggregate_of_huge_values_is_exact_where_the_answer_fits(values, expected):
    result = run("aggregate", {"values": values})

    for name, value in expected.items():
        if name == "sum":
            assert result[name] == value
        else:
            assert result[name] == pytest.approx(value, rel=1e-15), name
    assert result["percentiles"]["50"] == float(np.percentile(values, 50))


@pytest.mark.parametrize(
    ("values", "name"),
    [([1.7e308, 1.7e308], "sum"), ([1.7e308, -1.7e308], "standard deviation")],
)
def test_aggregate_whose_answer_is_beyond_a_double_fails_saying_so(values, name):
    with pytest.raises(JobError, match=f"^the {name} of these values is beyond"):
        run("aggregate", {"values": values})


def test_a_result_json_cannot_carry_fails_the_job_rather_than_turn_to_null():
    from pydantic import BaseModel

    mine = JobCatalog()

    class Nothing(BaseModel):
        pass

    @mine.task("infinite")
    def infinite(payload: Nothing, context: JobContext) -> dict:
        return {"values": [1.0, float("inf")]}

    with pytest.raises(JobError, match=r"result_data\.values\.1: the number is not"):
        mine.get("infinite").run({}, JobContext())


@pytest.mark.parametrize(
    "payload",
    [
        {"values": []},
        {"values": [1, "2"]},
        {"values": [1], "percentiles": [101]},
        {"values": [1], "percentiles": [-0.5]},
        {"values": [float("nan")]},
    ],
)
def test_aggregate_refuses_bad_values_or_percentiles(payload):
    with pytest.raises(InvalidPayload):
        catalog.validate("aggregate", payload)


def test_fail_raises_its_message():
    with pytest.raises(JobError, match="^disk on fire$") as caught:
        run("fail", {"message": "disk on fire"})
    assert not isinstance(caught.value, RetryableJobError)


def test_retryable_fail_raises_a_retryable_error():
    with pytest.raises(RetryableJobError, match="^try again$"):
        run("fail", {"message": "try again", "retryable": True})


def test_unknown_task_lists_the_known_tasks():
    with pytest.raises(UnknownTask) as caught:
        catalog.validate("mine_bitcoin", {})
    assert caught.value.known == catalog.names()
    assert "echo" in str(caught.value)


def test_adding_a_task_type_is_one_decorated_function():
    from pydantic import BaseModel

    mine = JobCatalog()

    class ReversePayload(BaseModel):
        text: str

    @mine.task("reverse")
    def reverse(payload: ReversePayload, context: JobContext) -> dict:
        return {"reversed": payload.text[::-1]}

    assert mine.names() == ["reverse"]
    assert mine.get("reverse").run({"text": "abc"}, JobContext()) == {"reversed": "cba"}


def test_a_handler_without_a_payload_model_is_refused():
    mine = JobCatalog()

    with pytest.raises(TypeError, match="payload"):

        @mine.task("untyped")
        def untyped(payload, context):  # type: ignore[no-untyped-def]
            return {}


@pytest.mark.parametrize("retry", [1, 2, 3, 8, 20])
def test_retry_delay_doubles_with_jitter_up_to_the_cap(retry):
    rng = random.Random(retry)
    ceiling = min(60.0, 2.0 * 2 ** (retry - 1))

    delays = [retry_delay_s(retry, base_s=2.0, cap_s=60.0, rng=rng) for _ in range(200)]

    assert all(ceiling / 2 <= d <= ceiling for d in delays)
    assert len(set(delays)) > 1
