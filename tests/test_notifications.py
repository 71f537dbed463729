"""Classifying one input line: the three shapes, exact payloads, and each quarantine rule (no database)."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from helpers import MT, bare, bayeux, data, envelope
from hypothesis import given, settings
from hypothesis import strategies as st

from store.ingest.files import decode_line
from store.notifications import as_text, envelope_line, parse_line, parse_timestamp

UTC = dt.UTC


def test_bayeux_message_is_classified_and_kept_whole():
    line = bayeux(data("StatusChange", "W1", state="Invited", ref=8), mid="17")
    n = parse_line(line)
    assert n.quarantine_reason is None
    assert (n.channel, n.message_id, n.message_type, n.notification_type, n.workitem_id, n.reference_id) == (
        "/v2/me/workitems", "17", MT, "StatusChange", "W1", "8")
    assert n.payload == line
    assert n.source is None and n.received_at is None  # the reader supplies them


def test_bare_data_line_has_no_channel_or_id():
    line = bare(data("PropertiesUpdated", "W2"))
    n = parse_line(line)
    assert n.quarantine_reason is None
    assert n.channel is None and n.message_id is None
    assert n.notification_type == "PropertiesUpdated" and n.workitem_id == "W2"
    assert n.payload == line


def test_envelope_payload_is_the_raw_message_text_byte_for_byte():
    message = ('{ "data" :{"workitem": {"id" : "W3"},  "notificationType":"StatusChange","messageType":"' + MT
               + '"} ,\t"id":"m1" ,"channel":"/v2/me/workitems"}')
    line = '{"source" : "agent-1" ,  "message" :   ' + message + '   , "received_at":"2026-11-02T10:00:00.5+02:00"}'
    n = parse_line(line)
    assert n.payload == message
    assert n.source == "agent-1"
    assert n.received_at == dt.datetime(2026, 11, 2, 8, 0, 0, 500000, tzinfo=UTC)
    assert n.message_id == "m1" and n.workitem_id == "W3" and n.quarantine_reason is None


def test_envelope_without_offset_is_utc():
    n = parse_line(envelope(bare(data()), "s", "2026-11-02T08:00:00"))
    assert n.received_at == dt.datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
    assert n.received_at.utcoffset() == dt.timedelta(0)


def test_reference_id_number_becomes_text():
    assert parse_line(bare(data(ref=8))).reference_id == "8"
    assert parse_line(bare(data(ref="8"))).reference_id == "8"
    assert as_text(8) == "8" and as_text(None) is None and as_text("") is None


QUARANTINED = {
    "not JSON": ('{"data": {"messageType": "Workitem', "not JSON"),
    "JSON but not an object": ("[1, 2, 3]", "not a JSON object"),
    "data missing": (json.dumps({"channel": "/v2/me/workitems", "id": "1"}), "data is missing"),
    "data a string": (json.dumps({"data": "hello"}), "data is not an object"),
    "data a list": (json.dumps({"data": [data()]}), "data is not an object"),
    "other messageType": (bare(data(message_type="CallStateChangeMessage")), "messageType"),
    "no messageType": (json.dumps({"data": {"notificationType": "StatusChange", "workitem": {"id": "w"}}}),
                       "messageType"),
    "other notificationType": (bare(data("Deleted")), "notificationType"),
    "StatusChange without workitem.id": (bare(data("StatusChange", None, state="Invited")),
                                         "StatusChange without workitem.id"),
    "PropertiesUpdated without workitem": (bare(data("PropertiesUpdated", None)),
                                           "PropertiesUpdated without workitem.id"),
    "Error with neither": (bare(data("Error", None, code=500)), "Error with neither referenceId nor workitem.id"),
    "envelope bad received_at": (envelope(bare(data()), "s", "yesterday"), "envelope received_at"),
    "envelope empty source": (envelope(bare(data()), "", "2026-11-02T08:00:00Z"), "envelope source"),
}


@pytest.mark.parametrize("case", sorted(QUARANTINED))
def test_each_quarantine_rule(case):
    line, reason = QUARANTINED[case]
    n = parse_line(line)
    assert n.quarantine_reason is not None and reason in n.quarantine_reason
    assert n.payload in line


@pytest.mark.parametrize("d", [
    data("Error", None, ref=5, code=403),  # referenceId only
    data("Error", "w9", code=403),  # workitem.id only
    data("PropertiesUpdated", "w9"),
    data("StatusChange", "w9", state="Processing"),
], ids=["error-ref-only", "error-workitem-only", "properties", "status"])
def test_acceptable_notifications_are_not_quarantined(d):
    assert parse_line(bare(d)).quarantine_reason is None


def test_raw_byte_lines():
    assert decode_line(b"   \r\n") is None  # blank: skipped
    assert decode_line((bare(data()) + "\r\n").encode()).payload == bare(data())
    bad = decode_line(b'{"data": "\xff"}\n')
    assert bad.quarantine_reason.startswith("not UTF-8")
    nul = decode_line(b'{"data": 1}\x00\n')
    assert nul.quarantine_reason.startswith("not JSON") and "\x00" not in nul.payload


def test_parse_timestamp_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_timestamp(12345)
    assert parse_timestamp("2026-11-02T08:00:00Z") == dt.datetime(2026, 11, 2, 8, tzinfo=UTC)


# -- property: an envelope carries its message's text unchanged -----------------------------------

# Strings a store can hold: no NUL, no lone surrogates (those lines are quarantined, see test_log).
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=8)
json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(texts, inner, max_size=3), max_leaves=8)
whitespace = st.text(alphabet=" \t", max_size=3)


@settings(max_examples=50, deadline=None)
@given(message=st.dictionaries(texts, json_values, max_size=4),
       sep=st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
       ws=whitespace, source=texts.filter(bool),
       stamp=st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2100, 1, 1)))
def test_envelope_line_round_trips_any_message(message, sep, ws, source, stamp):
    payload = json.dumps(message, separators=sep).replace("\n", " ")
    when = stamp.replace(tzinfo=UTC)
    n = parse_line(envelope_line(when, source, payload))
    assert n.payload == payload
    assert n.source == source and n.received_at == when
    # and an envelope written by hand, with odd whitespace and key order
    line = (f'{{{ws}"message"{ws}:{ws}{payload}{ws},"source":{json.dumps(source)},{ws}'
            f'"received_at":"{when.isoformat()}"}}')
    assert parse_line(line).payload == payload


@pytest.mark.parametrize("line", [
    '{"data": {"x": NaN}}', '{"data": {"x": Infinity}}', '{"data": {"x": -Infinity}}', '{"data": {"x": 1e400}}',
    '{"data": {"x": "a\\u0000b"}}', '{"data": {"x\\u0000": 1}}', '{"data": {"x": ["\\ud800"]}}',
    '{"data": {"x": "\\udfff\\ud800"}}', 'NaN', '[Infinity]',
    '{"received_at": "2026-11-02T08:00:00Z", "source": "s", "message": {"data": {"id": "\\u0000"}}}',
])
def test_json_a_store_cannot_hold_is_quarantined_as_not_json(line):
    n = parse_line(line)
    assert n.quarantine_reason is not None and n.quarantine_reason.startswith("not JSON"), n
    assert n.payload == line


@pytest.mark.parametrize("line", [
    '{"data": {"x": 1e300, "y": -0.0, "z": 123456789012345678901234567890}}',
    '{"data": {"x": "\\u00e9\\ud83d\\ude00", "y": "a\\\\u0000"}}',  # a pair; an escaped backslash
])
def test_storable_json_is_not_refused(line):
    assert not (parse_line(line).quarantine_reason or "").startswith("not JSON")


def test_line_form_of_an_export():
    line = json.dumps({"received_at": "2026-11-02T08:00:00Z", "source": 7, "line": "garbage"})
    n = parse_line(line)  # a source that is no string cannot be stored: the line is quarantined
    assert n.source is None and n.quarantine_reason is not None and n.payload == line
    n = parse_line(json.dumps({"received_at": "2026-11-02T08:00:00Z", "source": "s", "line": "garbage"}))
    assert (n.source, n.payload) == ("s", "garbage") and n.quarantine_reason.startswith("not JSON")
    n = parse_line(json.dumps({"received_at": "2026-11-02T08:00:00Z", "source": "s", "line": "garbage",
                               "quarantine_reason": "not UTF-8 text: invalid start byte at byte 3"}))
    assert (n.source, n.quarantine_reason) == ("s", "not UTF-8 text: invalid start byte at byte 3")
    assert n.received_at == dt.datetime(2026, 11, 2, 8, tzinfo=UTC)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40).filter(lambda s: "\n" not in s)
       | st.builds(lambda v: json.dumps(v, ensure_ascii=False),
                   st.dictionaries(st.text(max_size=4), json_values | st.text(), max_size=3)))
def test_any_line_is_classified_and_what_is_kept_can_be_stored(line):
    n = parse_line(line)  # never raises
    assert isinstance(n.payload, str)
    for value in (n.source, n.channel, n.message_id, n.message_type, n.notification_type, n.workitem_id,
                  n.reference_id, n.quarantine_reason):
        if value is not None:
            assert "\x00" not in value
            value.encode("utf-8")  # no lone surrogates


def test_integers_beyond_64_bits_stay_exact():
    big = 2**70
    line = bayeux(data("StatusChange", "W1", state="Invited", ref=big + 1), mid=None).replace(
        '{"channel"', f'{{"id": {big}, "channel"', 1)
    n = parse_line(line)
    assert (n.message_id, n.reference_id) == (str(big), str(big + 1))
    wrapped = parse_line(envelope(line, received_at="2026-11-02T08:00:00Z", source="s"))
    assert (wrapped.message_id, wrapped.reference_id, wrapped.payload) == (str(big), str(big + 1), line)


def test_bytes_not_utf8_with_nul_are_kept_storable():
    n = decode_line(b"\xff\x00{}\n")
    assert "\x00" not in n.payload and n.payload == "\\xff\\x00{}"
    assert n.quarantine_reason.startswith("not UTF-8 text")


def test_empty_capability_names_are_dropped_whatever_the_other_entries():
    from store.projections.workitems import capability_list

    assert capability_list(["", "Accept"]) == capability_list(["", "Accept", None]) == ["Accept"]
    assert capability_list(["Accept", 5, "Accept"]) == ["Accept", "5"]
