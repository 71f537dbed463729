"""``verify`` reports what differs as data: each projection row the store has next to the row the
log says it should have (by primary key), with NULL as None, never the text 'None'; and a NULL in
an extracted column of the log shows as NULL."""

from __future__ import annotations

import datetime as dt

from helpers import feed, tamper_log
from sqlalchemy import delete, select, text, update

from store.projections import runner
from store.schema import event_log, request_outcomes, workitem_transitions, workitems
from store.simulate import simulate
from store.verify import verify


def _strings(value) -> list[str]:
    """Every text inside a value made of dicts, lists and scalars."""
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_differences_pair_the_store_row_with_the_log_row(engine):
    feed(engine, list(simulate(200, agents=3, seed=21)), source="sim")
    runner.project(engine)
    with engine.begin() as conn:
        changed, gone = conn.execute(select(workitems.c.workitem_id).order_by(workitems.c.workitem_id).limit(2)
                                     ).scalars().all()
        log_row = dict(conn.execute(select(workitems).where(workitems.c.workitem_id == changed)).one()._mapping)
        assert log_row["uri"] is not None and isinstance(log_row["capabilities"], list)
        conn.execute(update(workitems).where(workitems.c.workitem_id == changed)
                     .values(uri=None, notification_count=workitems.c.notification_count + 1))
        first = conn.execute(select(workitem_transitions).where(workitem_transitions.c.workitem_id == gone)
                             .order_by(workitem_transitions.c.seq).limit(1)).one()._mapping
        conn.execute(delete(workitem_transitions).where(workitem_transitions.c.workitem_id == gone,
                                                        workitem_transitions.c.seq == first["seq"]))
        at = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)
        conn.execute(request_outcomes.insert().values(
            source="nobody", reference_id="42", workitem_id=None, outcome="failed", error_code=None,
            error_message=None, notification_count=1, first_seq=1, last_seq=1, first_at=at, last_at=at))
    with engine.connect() as conn:
        report = verify(conn)
    assert not report.ok and report.chain_break is None and report.column_mismatch is None
    assert set(report.differences) == {"workitems", "workitem_transitions", "request_outcomes"}

    items = report.differences["workitems"]
    assert (items["missing"], items["unexpected"]) == (1, 1)
    (pair,) = items["pairs"]
    assert pair["key"] == {"workitem_id": changed}
    assert pair["log"] == log_row  # every column, as the store reads it (JSON decoded, datetimes)
    assert pair["store"] == {**log_row, "uri": None, "notification_count": log_row["notification_count"] + 1}

    (pair,) = report.differences["workitem_transitions"]["pairs"]
    assert pair == {"key": {"workitem_id": gone, "seq": first["seq"]}, "store": None, "log": dict(first)}
    outcomes = report.differences["request_outcomes"]
    assert (outcomes["missing"], outcomes["unexpected"]) == (0, 1)
    (pair,) = outcomes["pairs"]
    assert pair["key"] == {"source": "nobody", "reference_id": "42"} and pair["log"] is None
    assert pair["store"]["workitem_id"] is None and pair["store"]["error_code"] is None
    assert "None" not in _strings(report.differences)


def test_at_most_examples_pairs_are_kept_while_every_row_is_counted(engine):
    feed(engine, list(simulate(300, agents=3, seed=22)), source="sim")
    runner.project(engine)
    with engine.begin() as conn:
        total = conn.execute(text("SELECT count(*) FROM workitems")).scalar_one()
        conn.execute(update(workitems).values(state=None))
    with engine.connect() as conn:
        items = verify(conn).differences["workitems"]
    assert total > 3 and (items["missing"], items["unexpected"]) == (total, total)
    assert len(items["pairs"]) == 3
    assert all(p["store"]["state"] is None and p["log"]["state"] is not None for p in items["pairs"])


def test_a_null_in_an_extracted_column_shows_as_null(engine):
    feed(engine, list(simulate(20, agents=1, seed=23)), source="sim")
    runner.project(engine)
    with engine.connect() as conn:
        seq, wid = conn.execute(select(event_log.c.seq, event_log.c.workitem_id)
                                .where(event_log.c.workitem_id.is_not(None)).order_by(event_log.c.seq).limit(1)).one()
    tamper_log(engine, f"UPDATE event_log SET workitem_id = NULL WHERE seq = {seq}")
    with engine.connect() as conn:
        report = verify(conn)
    bad = report.column_mismatch
    assert (bad.seq, bad.what, bad.expected, bad.found) == (seq, "workitem_id", wid, "NULL")
