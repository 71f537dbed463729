"""Property tests (hypothesis) over generated notification streams, on SQLite and PostgreSQL.

1. Any split of a stream into import batches, with incremental ``project`` runs after any of
   them, leaves the four projection tables exactly equal to one full rebuild (and verify ok).
2. Export, then import into an empty database, reproduces the log and the projections.
"""

from __future__ import annotations

import io
import json

from helpers import (
    MT,
    at,
    bare,
    bayeux,
    data,
    envelope,
    feed,
    fresh_store,
    log_rows,
    on_both_engines,
    projection_snapshot,
)
from hypothesis import strategies as st
from sqlalchemy import select

from store.export import export_lines
from store.ingest.files import import_stream
from store.projections import runner
from store.schema import event_log
from store.verify import verify

WORKITEMS = ["W1", "W2", "W3", "W4"]
STATES = ["Invited", "Processing", "Completed", "Revoked"]
CAPS = ["Accept", "Reject", "Complete", "Transfer", "AttachUserData"]
SOURCES = ["agent-1", "agent-2"]
FILE_SOURCES = ["file:a.jsonl", "file:b.jsonl"]

BAD_LINES = [
    "this is not json",
    '{"data": {"messageType": "WorkitemStateChangeMessage", "notificationType": "StatusChange"',
    "[1, 2, 3]",
    "17",
    json.dumps({"channel": "/v2/me/workitems", "id": "x", "data": "text"}),
    json.dumps({"data": [1, 2]}),
    bare(data("StatusChange", "W1", state="Deleted", message_type="CallStateChangeMessage")),
    bare(data("Deleted", "W2", state="Deleted", ref=1)),
    bare(data("StatusChange", None, state="Completed", ref=2)),
    bare(data("PropertiesUpdated", None, caps=["X"])),
    bare(data("Error", None, code=500)),
    envelope(bare(data("StatusChange", "W1", state="Completed")), "agent-1", "not a time"),
    bare(data("StatusChange", "W1", state="Completed", user_data={"n": float("nan")})),
    '{"data": {"messageType": "' + MT + '", "notificationType": "StatusChange", "workitem": {"id": "W1\\u0000"}}}',
]
# Lines that only raw bytes or exact spacing can express (exercise export's "line" form).
ODD_LINES = [
    b'{"data": "caf\xe9"}',
    b'\xff{"data": {}}',
    b'{"data": {}}\x00',
    ("  " + bare(data("StatusChange", "W2", state="Processing", caps=["Complete"])) + "\t").encode(),
    (" " + bayeux(data("PropertiesUpdated", "W3", user_data={"big": 1e16}), mid="odd") + " ").encode(),
    json.dumps({"received_at": "2026-11-02T08:00:00Z", "source": "agent-2", "line": "not json"}).encode(),
]


@st.composite
def change(draw):
    ntype = draw(st.sampled_from(["StatusChange", "PropertiesUpdated"]))
    kwargs = {}
    if draw(st.booleans()) or ntype == "StatusChange":
        kwargs["state"] = draw(st.sampled_from(STATES))
    if draw(st.booleans()):
        kwargs["caps"] = draw(st.lists(st.sampled_from(CAPS), unique=True, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        values = st.integers(0, 3) | st.text("xy", max_size=2)
        kwargs["user_data"] = draw(st.dictionaries(st.sampled_from("abc"), values, max_size=2))
    if draw(st.booleans()):
        kwargs["ref"] = draw(st.integers(1, 6))
    return data(ntype, draw(st.sampled_from(WORKITEMS)), **kwargs)


@st.composite
def error(draw):
    kwargs = {}
    wid = draw(st.none() | st.sampled_from(WORKITEMS))
    if wid is None or draw(st.booleans()):
        kwargs["ref"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        kwargs["code"] = draw(st.sampled_from([403, 404, 500, "E1"]))
    if draw(st.booleans()):
        kwargs["message"] = draw(st.sampled_from(["denied", "timeout"]))
    if draw(st.booleans()):  # an Error that carries a workitem resource must still change nothing
        kwargs["state"] = draw(st.sampled_from(STATES))
        kwargs["caps"] = []
    return data("Error", wid, **kwargs)


@st.composite
def good_line(draw):
    d = draw(st.one_of(change(), change(), change(), error()))
    shape = draw(st.sampled_from(["envelope", "bayeux", "bare"]))
    mid = draw(st.none() | st.integers(1, 12).map(str))  # a small id space: duplicates happen
    message = bayeux(d, mid) if shape != "bare" else bare(d)
    if shape == "envelope":
        return envelope(message, draw(st.sampled_from(SOURCES)), at(draw(st.integers(0, 10_000))))
    return message


@st.composite
def stream(draw, odd: bool = False):
    """(lines, batches) where batches are (end index, import source, project afterwards)."""
    # A fixed start that gives every projection table rows, so no comparison is of empty tables.
    lines: list = [
        envelope(bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept", "Reject"], ref=1), "p1"),
                 "agent-1", at(0)),
        envelope(bayeux(data("Error", "W1", ref=2, code=409), "p2"), "agent-1", at(1)),
    ]
    kinds = [good_line(), good_line(), good_line(), st.sampled_from(BAD_LINES)]
    if odd:
        kinds.append(st.sampled_from(ODD_LINES))
    for _ in range(draw(st.integers(0, 40))):
        if lines and draw(st.integers(0, 9)) == 0:
            lines.append(draw(st.sampled_from(lines)))  # the same line delivered again
        else:
            lines.append(draw(st.one_of(*kinds)))
    cuts = sorted(set(draw(st.lists(st.integers(1, len(lines)), max_size=6))) | {len(lines)})
    batches = [(end, draw(st.sampled_from(FILE_SOURCES)), draw(st.booleans())) for end in cuts]
    return lines, batches


def load(engine, lines, batches):
    start = 0
    for end, source, project in batches:
        feed(engine, lines[start:end], source=source, file_name=f"batch-{start}")
        start = end
        if project:
            runner.project(engine)


@on_both_engines(stream(), sqlite=40, postgresql=15)
def test_incremental_projection_equals_rebuild(engine_kind, generated):
    lines, batches = generated
    with fresh_store(engine_kind) as engine:
        load(engine, lines, batches)
        runner.project(engine)
        with engine.connect() as conn:
            seqs = conn.execute(select(event_log.c.seq).order_by(event_log.c.seq)).scalars().all()
            assert seqs == list(range(1, len(lines) + 1))
            incremental = projection_snapshot(conn)
            assert all(incremental.values()), "every projection table has rows"
            report = verify(conn)
            assert report.ok, (report.chain_break, report.differences)
        assert runner.project(engine).applied == 0  # idempotent
        runner.rebuild(engine)
        with engine.connect() as conn:
            assert projection_snapshot(conn) == incremental
            assert verify(conn).ok


@on_both_engines(stream(odd=True), sqlite=25, postgresql=8)
def test_export_then_import_reproduces_everything(engine_kind, generated):
    lines, batches = generated
    with fresh_store(engine_kind) as engine, fresh_store(engine_kind) as copy:
        load(engine, lines, batches)
        runner.project(engine)
        with engine.connect() as conn:
            original = log_rows(conn)
            projections = projection_snapshot(conn)
            exported = "".join(line + "\n" for line in export_lines(conn))
        import_stream(copy, io.BytesIO(exported.encode()), file_name="export.jsonl", source="restore")
        runner.project(copy)
        with copy.connect() as conn:
            assert log_rows(conn) == original
            assert projection_snapshot(conn) == projections
            assert verify(conn).ok
