"""The collector's fast Result encoder gives exactly the bytes of the model's own."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.schemas import ErrorInfo, Result

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
objects = st.none() | st.dictionaries(st.text(max_size=5), json_values, max_size=4)


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from(["completed", "failed", "cancelled"]),
    response=objects,
    error=st.none() | st.builds(ErrorInfo, code=st.text(max_size=5), message=st.text()),
    usage=objects,
    batch_id=st.none() | st.text(max_size=8),
    attempts=st.integers(0, 10),
    metadata=objects,
    dry_run=st.booleans(),
)
def test_encode_gives_the_bytes_of_the_model(**fields: Any) -> None:
    # Given any result the collector can build, when it is encoded without the model
    # then the bytes are the model's own, so SQL and the stream hold what to_json gives.
    assert Result.encode(request_id="r1", **fields) == Result(request_id="r1", **fields).to_json()


def test_encode_refuses_metadata_that_is_not_an_object_as_the_model_does() -> None:
    # Given metadata stored as a JSON list, when encoded, then both ways refuse it.
    with pytest.raises(ValueError):
        Result(request_id="r1", status="completed", metadata=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="metadata must be a JSON object"):
        Result.encode(request_id="r1", status="completed", metadata=[1])  # type: ignore[arg-type]


wide_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from(["completed", "failed", "cancelled"]),
    response=st.none() | st.dictionaries(st.text(max_size=5), wide_json_values, max_size=4),
    error=st.none() | st.builds(ErrorInfo, code=st.text(max_size=5), message=st.text()),
    attempts=st.integers(0, 10),
    metadata=st.none() | st.dictionaries(st.text(max_size=5), wide_json_values, max_size=4),
    dry_run=st.booleans(),
)
def test_a_consumer_reads_back_the_result_the_collector_encoded(**fields: Any) -> None:
    # Given any result the collector can encode (floats, 64-bit integers, any text), when a
    # consumer parses the bytes from its stream then it gets the very same Result: every
    # number, escape and key comes back as the encoder wrote it.
    assert Result.from_json(Result.encode(request_id="r1", **fields)) == Result(
        request_id="r1", **fields
    )
