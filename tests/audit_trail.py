"""A hand-made audit trail: twelve log rows about two workitems (W1, W2) whose every row, and
what history and state make of it, the audit tests know (tests/test_audit_*.py).

Imported as ``audit_trail`` (pytest puts the tests directory on sys.path).
"""

from __future__ import annotations

import datetime as dt

from helpers import at, bare, bayeux, data, envelope


def t(i: int) -> dt.datetime:
    """received_at of the i-th line (seq i + 1) of TRAIL_LINES."""
    return at(i) + dt.timedelta(microseconds=250_001)


def env(message: str, i: int, source: str = "agent-1") -> str:
    return envelope(message, source, t(i))


M1 = bayeux(data("StatusChange", "W1", state="Invited", caps=["Accept", "Reject"], user_data={"Subject": "Refund"},
                 ref=1), "m1")
TRAIL_LINES = [
    env(M1, 0),                                                                                   # 1
    env(bayeux(data("StatusChange", "W2", state="Invited", caps=["Accept"], ref=2), "m2"), 1),     # 2 another workitem
    env(M1, 2),                                                                                   # 3 duplicate of 1
    env(bayeux(data("StatusChange", "W1", state="Processing", caps=["Transfer", "Complete"], ref=3), "m3"), 3),  # 4
    env(bayeux(data("PropertiesUpdated", "W1", user_data={"Subject": "Refund", "Note": "n1"}, ref=4), "m4"), 4),  # 5
    env(bayeux(data("Error", None, ref=4, code=500, message="timeout"), "m5"), 5),  # 6 only W1's referenceId
    env(bayeux(data("Error", None, ref=4, code=403), "x1"), 6, "agent-2"),  # 7 same id, other session
    env(bare(data("Deleted", "W1", state="Gone")), 7),                                            # 8 quarantined
    env(bayeux(data("Error", "W1", ref=5, code=409, message="locked"), "m6"), 8),                 # 9
    env(bayeux(data("PropertiesUpdated", "W1", caps=["Complete"], user_data={"Note": "n2", "Queue": "q"},
                    ref=6), "m7"), 9),                                                            # 10
    env(bayeux(data("StatusChange", "W1", state="Completed", caps=[], ref=7), "m8"), 10),         # 11
    env(bayeux(data("Error", None, ref=99, code=404), "m9"), 11),                                 # 12 another request
]
W1_SEQS = [1, 3, 4, 5, 6, 8, 9, 10, 11]
W1_CHANGES = {
    1: dict(notification_type="StatusChange", reference_id="1", state_to="Invited",
            capabilities_granted=["Accept", "Reject"], user_data_changes={"added": {"Subject": "Refund"}},
            request_outcome="succeeded"),
    3: dict(notification_type="StatusChange", reference_id="1", status="duplicate of seq 1",
            request_outcome="succeeded"),
    4: dict(notification_type="StatusChange", reference_id="3", state_from="Invited", state_to="Processing",
            capabilities_granted=["Transfer", "Complete"], capabilities_revoked=["Accept", "Reject"],
            request_outcome="succeeded"),
    5: dict(notification_type="PropertiesUpdated", reference_id="4", user_data_changes={"added": {"Note": "n1"}},
            request_outcome="failed"),
    6: dict(notification_type="Error", reference_id="4", request_outcome="failed", error_code="500",
            error_message="timeout"),
    8: dict(notification_type="Deleted"),
    9: dict(notification_type="Error", reference_id="5", request_outcome="failed", error_code="409",
            error_message="locked"),
    10: dict(notification_type="PropertiesUpdated", reference_id="6", capabilities_revoked=["Transfer"],
             user_data_changes={"added": {"Queue": "q"}, "changed": {"Note": ["n1", "n2"]}, "removed": ["Subject"]},
             request_outcome="succeeded"),
    11: dict(notification_type="StatusChange", reference_id="7", state_from="Processing", state_to="Completed",
             capabilities_revoked=["Complete"], request_outcome="succeeded"),
}

