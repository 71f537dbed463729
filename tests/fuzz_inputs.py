"""Hostile input lines in the 18 categories of issue 8's fuzzing run, as fixed examples and as
hypothesis strategies.

Each category lists raw lines (bytes, without terminator).  ``scale`` sizes the big ones: 1 for
CI (a 1 MB line, a 100,000-element array), larger for the long run (``--fuzz-examples``; scale
50 gives the 50 MB line of the original run).  Imported, every line that is not blank must
become one row, and the store must verify.
"""

from __future__ import annotations

import functools
import json

from hypothesis import strategies as st

MT = "WorkitemStateChangeMessage"
UTC_AT = "2026-11-02T08:00:00Z"


def message(wid="w1", ntype="StatusChange", ref=None, **workitem) -> dict:
    data = {"messageType": MT, "notificationType": ntype, "workitem": {"id": wid, **workitem}}
    if ref is not None:
        data["referenceId"] = ref
    return {"channel": "/v2/me/workitems", "data": data}


def line(value) -> bytes:
    return json.dumps(value).encode()


def raw_message(workitem_text: str, extra: str = "") -> bytes:
    """A message whose workitem object is given as raw JSON text (for what json.dumps cannot write)."""
    return (f'{{"channel": "/v2/me/workitems", "data": {{"messageType": "{MT}", "notificationType": '
            f'"StatusChange"{extra}, "workitem": {workitem_text}}}}}').encode()


def envelope(message_text: str, received_at=UTC_AT, source="fuzz", **extra) -> bytes:
    head = {"received_at": received_at, "source": source, **extra}
    return (json.dumps(head)[:-1] + f', "message": {message_text}}}').encode()


def nested(depth: int, leaf: str = "0") -> str:
    return "[" * depth + leaf + "]" * depth


@functools.cache
def categories(scale: int = 1) -> dict[str, list[bytes]]:
    big = 100_000 * scale
    ok = json.dumps(message("ok-1", state="Processing", capabilities=["Complete"]))
    return {
        "deep nesting": [
            raw_message(f'{{"id": "deep-1", "userData": {{"k": {nested(127)}}}}}'),
            raw_message(f'{{"id": "deep-2", "userData": {nested(200)}}}'),
            raw_message(f'{{"id": "deep-3", "userData": {nested(1_000)}}}'),
            nested(100_000).encode(),
            ("{" + '"a":{' * 100_000 + "}" * 100_001).encode(),
            envelope(json.dumps(message("deep-4", userData=json.loads(nested(126))))),
            envelope(ok, extra=json.loads(nested(300))),
        ],
        "timestamps out of range": [
            envelope(ok, "9999-12-31T23:59:59-23:59"),
            envelope(ok, "0001-01-01T00:00:00+01:00"),
            envelope(ok, "0001-01-01T00:00:00Z"),
            envelope(ok, "9999-12-31T23:59:59.999999Z"),
            envelope(ok, "99999-01-01T00:00:00Z"),
            envelope(ok, 1_700_000_000),
            envelope(ok, "2026-13-45T25:61:61Z"),
            (b'{"id": "x", "data": {"messageType": "' + MT.encode() + b'", "notificationType": "StatusChange", '
             b'"workitem": {"id": "ts-1", "state": "Processing"}}, "received_at": "9999-12-31T23:59:59-23:59"}'),
        ],
        "keys too long to index": [
            line(message("w" * 6_000)),
            line(message("ref-1", ref="r" * 3_000)),
            line({**message("mid-1"), "id": "m" * 3_000}),
            envelope(ok, source="s" * 3_000),
            envelope(ok, session="x" * 3_000),
            line(message("é" * 300)),  # 300 characters, 600 bytes
            line(message("ok-long-cap", capabilities=["c" * 5_000, "Complete"])),
            line(message("w" * 512)),  # exactly the limit: accepted
        ],
        "unpaired surrogates": [
            raw_message('{"id": "\\ud800"}'),
            raw_message('{"id": "sur-1", "userData": {"\\udc00key": 1}}'),
            raw_message('{"id": "sur-2", "userData": "\\udc00\\ud800"}'),
            raw_message('{"id": "sur-3", "userData": "\\ud83d\\ude00"}'),  # a valid pair: accepted
        ],
        "NUL": [
            raw_message('{"id": "nul-1", "userData": {"k": "a\\u0000b"}}'),
            raw_message('{"id": "nul-2", "userData": {"k": "a\x00b"}}'),
            b'\x00',
        ],
        "non-finite numbers": [
            raw_message('{"id": "nan-1", "userData": NaN}'),
            raw_message('{"id": "nan-2", "userData": [Infinity, -Infinity]}'),
            raw_message('{"id": "nan-3", "userData": 1e400}'),
            raw_message('{"id": "nan-4", "userData": -1e999}'),
        ],
        "huge arrays": [
            line(message("arr-1", userData=list(range(big)))),
            line(message("arr-2", userData=[[]] * big)),
            line(message("arr-3", capabilities=[f"c{i}" for i in range(1_000)])),
        ],
        "line-variant envelopes": [
            line({"received_at": UTC_AT, "source": "fuzz", "line": ok, "quarantine_reason": "made up"}),
            line({"received_at": UTC_AT, "source": "fuzz", "line": ok, "quarantine_reason": "not UTF-8 text: x"}),
            line({"received_at": UTC_AT, "source": "fuzz", "line": "not json", "quarantine_reason": "data is missing"}),
            line({"received_at": UTC_AT, "source": "fuzz", "line": "{}", "quarantine_reason": 42}),
            line({"received_at": UTC_AT, "source": "fuzz",
                  "line": envelope(ok, "2026-11-03T00:00:00Z").decode(), "quarantine_reason": ""}),
            line({"received_at": UTC_AT, "source": "fuzz", "line": 17}),
        ],
        "big and odd numbers": [
            raw_message('{"id": "num-1", "userData": 1e300}'),
            raw_message('{"id": "num-2", "userData": 1.7976931348623157e308}'),
            raw_message('{"id": "num-3", "userData": {"a": 5e-324, "b": -0.0, "c": 1e-400}}'),
            raw_message('{"id": "num-4", "userData": 123456789012345678901234567890}', ', "referenceId": 1e16'),
            raw_message('{"id": "num-5", "userData": ' + "9" * 5_000 + "}"),
        ],
        "whitespace that is not JSON whitespace": [
            b"\x0b", b"\x0c", b"\x0b\x0c \t", "\u00a0".encode(), "\u2028".encode(), b"   \t ",
        ],
        "byte order marks": [
            b"\xef\xbb\xbf" + line(message("bom-1", state="Processing")),
            b"\xef\xbb\xbf",
            line(message("bom-2")) + b"\xef\xbb\xbf",
            b"\xef\xbb\xbf\xef\xbb\xbf" + line(message("bom-3")),
        ],
        "not UTF-8": [
            raw_message('{"id": "utf-1", "userData": "X"}').replace(b'"X"', b'"\xff"'),
            b"\xc0\xaf", b"\xed\xa0\x80", b'{"data": "\xe2\x82"}', b"\xff" * 10,
        ],
        "not JSON": [
            b"{", b'{"data": }', b"{'data': 1}", b'{"data": {}} trailing', b"// comment", b'{"a" 1}',
            line(message("nj-1"))[:-1], b'{"data": "\\x41"}', b"[1,]",
        ],
        "JSON that is not an object": [b"42", b'"text"', b"[]", b"null", b"true", b"[{\"data\": {}}]"],
        "huge lines": [
            line(message("big-1", userData={"blob": "x" * (1 << 20) * scale})),
            b"x" * (1 << 20) * scale,
        ],
        "wrong types": [
            line(message({"id": "object"})), line(message(["list"])), line(message(12.5)), line(message(True)),
            line(message(None)), line(message("")),
            line(message("wt-1", capabilities="Complete")), line(message("wt-2", capabilities=[{"a": 1}, None, 3, ""])),
            line(message("wt-3", userData=42)), line(message("wt-4", state=["x"], workitemType={"t": 1})),
            line({"data": [1, 2]}), line({"data": {"messageType": MT, "notificationType": 3}}),
            line(message("wt-5", ref={"r": 1})), line({"data": {"messageType": MT, "notificationType": "Error"}}),
            line({"channel": {"c": 1}, "id": [1], "data": message("wt-6")["data"]}),
        ],
        "control characters and markup": [
            line(message("\x1b[31mred\x1b[0m", state="Processing")),
            line(message("=cmd|' /C calc'!A0", userData={"x": "=HYPERLINK(\"http://x\")"})),
            line(message("cr\rinside", state="+1")), line(message("\t@tab", state="-2")),
            line(message("\u202eevil", userData={"\u0007bell": "\u0085next"})),
        ],
        "envelope oddities": [
            envelope(ok, kind="session"), envelope(ok, kind="nope"), envelope(ok, session=5), envelope(ok, source=""),
            line({"received_at": UTC_AT, "source": "fuzz", "kind": "session", "line": "not json"}),
            line({"received_at": UTC_AT, "source": "fuzz", "kind": "session", "line": nested(500)}),
            line({"received_at": UTC_AT, "source": "fuzz", "kind": "session",
                  "line": '{"event": "started", "x": "\\u0000"}'}),
            line({"received_at": UTC_AT, "source": "fuzz", "kind": "snapshot",
                  "line": json.dumps({"statusCode": 0,
                                      "workitems": [{"id": "w" * 600}, {"id": "snap-1", "state": "Processing"}]})}),
            line({"received_at": UTC_AT, "source": "fuzz", "kind": "snapshot",
                  "line": '{"statusCode": 0, "workitems": [NaN]}'}),
            envelope("42"), envelope('"x"'), envelope(ok, line="also a line"),
            (b'{"received_at": "' + UTC_AT.encode() + b'", "source": "a", "source": "b", "message": '
             + ok.encode() + b"}"),
        ],
        "valid notifications": [
            line(message("ok-2", state="Processing", capabilities=["Complete", "Transfer"], userData={"a": 1})),
            line(message("ok-2", ntype="PropertiesUpdated", state="Processing", capabilities=["Complete"])),
            line(message("ok-3", ntype="Error", ref=9)),
            line({**message("ok-4", state="Completed"), "id": "17"}),
            line({**message("ok-4", state="Completed"), "id": "17"}),  # a duplicate
        ],
    }


def is_blank(raw: bytes) -> bool:
    """What import skips: JSON whitespace only, after a byte order mark (docs/RULES.md 1)."""
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    return not raw.strip(b" \t\r\n")


# -- hypothesis: the categories, mutated -------------------------------------------------------

_NASTY_TEXT = st.text(st.characters(codec=None, blacklist_categories=()), max_size=40) | st.sampled_from([
    "\ud800", "\x00", "\x1b[2J", "=1+1", "\u2028", "é" * 300, "x" * 600, "", " ",
])
_JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                 | _NASTY_TEXT)
_JSON = st.recursive(_JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(_NASTY_TEXT, inner, max_size=4), max_leaves=12)


@st.composite
def hostile_lines(draw) -> bytes:
    """One line: a catalogue example, a message with hostile values, or random bytes."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        examples = categories()
        name = draw(st.sampled_from(sorted(set(examples) - {"huge lines", "huge arrays"})))  # those: the file test
        return draw(st.sampled_from(examples[name]))
    if choice == 1:
        text = json.dumps(message(draw(_JSON), draw(st.sampled_from(["StatusChange", "Error", "PropertiesUpdated"])),
                                  draw(_JSON), state=draw(_JSON), capabilities=draw(_JSON), userData=draw(_JSON)),
                          ensure_ascii=draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass")
    if choice == 2:
        return envelope(json.dumps(message(draw(st.text(max_size=8)))), draw(_NASTY_TEXT | st.just(UTC_AT)),
                        draw(_NASTY_TEXT), **draw(st.dictionaries(st.sampled_from(["kind", "session", "line"]), _JSON)))
    return draw(st.binary(max_size=60)).replace(b"\n", b" ")
