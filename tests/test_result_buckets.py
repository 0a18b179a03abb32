"""Bucketing result lines by their custom_id without parsing each line twice."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.result_buckets import leading_custom_id

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=12), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(
    before=st.dictionaries(st.text(max_size=12), json_values, max_size=3),
    after=st.dictionaries(st.text(max_size=12), json_values, max_size=3),
    custom_id=st.text(min_size=1, max_size=40),
)
def test_the_quick_read_is_the_parsed_custom_id_or_nothing(
    before: dict[str, Any], after: dict[str, Any], custom_id: str
) -> None:
    # Given any line with a custom_id among other keys, values and nested custom_ids
    line = {**before, "custom_id": custom_id, **after}
    line["custom_id"] = custom_id
    raw = orjson.dumps(line) + b"\n"

    # When its custom_id is read without parsing, then it is the parser's, or none at all
    assert leading_custom_id(raw) in (None, orjson.loads(raw)["custom_id"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"custom_id":"abc","response":{"body":{}}}\n', "abc"),
        (b'{"id": "batch_req_1", "custom_id" : "abc"}\n', "abc"),
        # a nested object comes first: only a parser can tell whose custom_id it is
        (b'{"a":{"custom_id":"inner"},"custom_id":"outer"}\n', None),
        # the last line of a cut file: parsed, so it is reported as truncated
        (b'{"custom_id":"abc"}', None),
        (b'{"custom_id":"a\\"b"}\n', None),
        (b'{"x":"\\"custom_id\\":\\"fake\\"","custom_id":"real"}\n', "real"),
        (b'{"custom_id":5}\n', None),
        (b"[1, 2]\n", None),
    ],
)
def test_the_quick_read_takes_only_the_usual_shape(raw: bytes, expected: str | None) -> None:
    # Given a line, when its custom_id is read quickly, then only a plain top-level one is
    assert leading_custom_id(raw) == expected
