"""A realistic, seeded stream of GWS workitem notifications (for demos, tests and benchmarks).

Workitems arrive at agents and live through Invited -> Processing -> Completed: accepted or
rejected, user data attached and updated, some transferred to another agent (Revoked here,
Invited there), some requests failing with Error notifications.  A rejection is what GWS
documents for WorkitemReject ("Status changed to Completed", no capabilities): Completed at the
rejecting agent, then Invited at another agent under the same id.  Each agent is one ``source``
with its own referenceId counter, as a GWS client session would be.  A small share of messages
is delivered twice (same Bayeux id, as after a reconnect) and, on request, some lines are noise
that the store must quarantine.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from .gws_protocol import CHANNEL, WORKITEMS_PATH
from .notifications import envelope_line

INVITED_CAPS = ["Accept", "Reject"]
PROCESSING_CAPS = ["Transfer", "AttachUserData", "UpdateUserData", "DeleteUserData", "SetInFocus", "Complete"]
ERRORS = [
    (403, "Operation not allowed in the current state"),
    (404, "Workitem not found"),
    (500, "Interaction server did not respond in time"),
    (409, "Workitem is locked by another operation"),
]
FORMATS = ("envelope", "bayeux", "bare")
SUBJECTS = ["Invoice dispute", "Address change", "Refund request", "Claim #", "Contract renewal"]


@dataclass
class _Agent:
    source: str
    next_reference: int = 1
    next_message: int = 1
    sent: list[str] = field(default_factory=list)  # recent payloads, for redelivery


Step = tuple[str, dict, str | None]  # (notificationType, workitem fields, operation)


@dataclass
class _Workitem:
    id: str
    type: str
    agent: int
    steps: Iterator[Step] = field(default_factory=lambda: iter(()))


class Simulator:
    def __init__(self, *, agents: int = 10, seed: int = 1, start: dt.datetime | None = None,
                 mean_gap_seconds: float = 2.0, error_rate: float = 0.05,
                 duplicate_rate: float = 0.01, noise_rate: float = 0.0):
        if agents < 1:
            raise ValueError("agents must be at least 1")
        self.rng = random.Random(seed)
        self.agents = [_Agent(f"agent-{i:03d}") for i in range(1, agents + 1)]
        self.clock = start or dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)
        self.mean_gap = mean_gap_seconds
        self.error_rate, self.duplicate_rate, self.noise_rate = error_rate, duplicate_rate, noise_rate
        self.queue: list[tuple[dt.datetime, int, _Workitem]] = []
        self.order = itertools.count()

    # -- one workitem's life, as (notificationType, workitem fields, operation) steps ----------
    def _life(self, w: _Workitem):
        rng = self.rng
        user_data = {"Subject": f"{rng.choice(SUBJECTS)} {rng.randint(1000, 9999)}",
                     "CustomerSegment": rng.choice(["gold", "silver", "bronze"])}
        while True:
            yield "StatusChange", {"state": "Invited", "capabilities": INVITED_CAPS, "userData": user_data}, None
            if rng.random() < 0.08:
                # GWS WorkitemReject: "Status changed to Completed", no capabilities; the workitem
                # then goes to another agent (a new Invited there, same id).
                yield "StatusChange", {"state": "Completed", "capabilities": []}, "Reject"
                w.agent = self._other_agent(w.agent)
                continue
            yield "StatusChange", {"state": "Processing", "capabilities": PROCESSING_CAPS}, "Accept"
            for _ in range(rng.randint(0, 3)):
                user_data = {**user_data, "Note": f"note {rng.randint(1, 999)}"}
                yield "PropertiesUpdated", {"state": "Processing", "capabilities": PROCESSING_CAPS,
                                            "userData": user_data}, "UpdateUserData"
            if rng.random() < 0.3:
                # While the agent edits, the Complete capability is withheld for a moment.
                yield "PropertiesUpdated", {"capabilities": PROCESSING_CAPS[:-1]}, "SetInFocus"
                yield "PropertiesUpdated", {"capabilities": PROCESSING_CAPS}, "SetInFocus"
            if rng.random() < 0.12 and len(self.agents) > 1:
                yield "StatusChange", {"state": "Revoked", "capabilities": []}, "Transfer"
                w.agent = self._other_agent(w.agent)
                continue
            yield "StatusChange", {"state": "Completed", "capabilities": []}, "Complete"
            return

    def _other_agent(self, agent: int) -> int:
        return (agent + self.rng.randint(1, len(self.agents) - 1)) % len(self.agents) if len(self.agents) > 1 else agent

    def _new_workitem(self) -> _Workitem:
        wid = "".join(self.rng.choices("0123456789ABCDEFGHJKLMNPQRSTUVWXYZ", k=16))
        kind = self.rng.choices(["Inbound", "Outbound", "Internal"], [8, 1, 1])[0]
        w = _Workitem(wid, kind, self.rng.randrange(len(self.agents)))
        w.steps = self._life(w)
        return w

    def _message(self, agent: _Agent, data: dict, fmt: str) -> str:
        if fmt == "bare":
            return json.dumps({"data": data})
        message = {"channel": CHANNEL, "id": str(agent.next_message), "data": data}
        agent.next_message += 1
        return json.dumps(message)

    def _noise(self) -> str:
        return self.rng.choice([
            '{"channel": "/v2/me/calls", "data": {"messageType": "CallStateChangeMessage", '
            '"notificationType": "StatusChange", "call": {"id": "c1"}}}',
            '{"data": {"messageType": "WorkitemStateChangeMessage", "notificationType": "StatusChange", '
            '"workitem": {"state": "Processing"}}}',
            '{"data": {"messageType": "WorkitemStateChangeMessage", "notificationType": "Err',
        ])

    def lines(self, count: int, fmt: str = "envelope") -> Iterator[str]:
        """Exactly ``count`` lines, in ``fmt``: envelope, bayeux or bare."""
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
        rng = self.rng
        emitted = 0
        next_arrival = self.clock
        while emitted < count:
            # New workitems arrive while fewer than ~3 per agent are open.
            if not self.queue or (len(self.queue) < 3 * len(self.agents) and next_arrival <= self.queue[0][0]):
                heapq.heappush(self.queue, (next_arrival, next(self.order), self._new_workitem()))
                next_arrival += dt.timedelta(seconds=rng.expovariate(1 / self.mean_gap))
                continue
            at, _, w = heapq.heappop(self.queue)
            self.clock = max(self.clock, at)
            step = next(w.steps, None)
            if step is None:
                continue
            notification_type, fields, operation = step
            agent = self.agents[w.agent]
            data: dict = {"messageType": "WorkitemStateChangeMessage", "notificationType": notification_type}
            if operation is not None:
                data["referenceId"] = agent.next_reference
                agent.next_reference += 1
            resource = {"id": w.id, "workitemType": w.type,
                        "uri": f"http://gws.example:8090{WORKITEMS_PATH}/{w.id}", **fields}
            if operation is not None and rng.random() < self.error_rate:
                code, text = rng.choice(ERRORS)
                data = {**data, "notificationType": "Error", "errorCode": code,
                        "errorMessage": f"{operation}: {text}", "workitem": {"id": w.id}}
                # The agent retries after a while: the same step comes again with a new request.
                w.steps = itertools.chain([step], w.steps)
            else:
                data["workitem"] = resource
            yield from self._emit(agent, self._message(agent, data, fmt), fmt)
            emitted += 1
            if emitted < count and rng.random() < self.duplicate_rate and agent.sent:
                yield from self._emit(agent, rng.choice(agent.sent[-20:]), fmt, record=False)
                emitted += 1
            if emitted < count and rng.random() < self.noise_rate:
                yield from self._emit(agent, self._noise(), fmt, record=False)
                emitted += 1
            gap = rng.expovariate(1 / (self.mean_gap * len(self.agents)))
            heapq.heappush(self.queue, (self.clock + dt.timedelta(seconds=gap), next(self.order), w))

    def messages(self, count: int | None = None) -> Iterator[tuple[str, dict]]:
        """``(source, Bayeux message)`` pairs, the messages of ``lines(count, "bayeux")`` with the
        agent each is for (a duplicate repeats an earlier message of that agent, id included);
        ``count`` None: without end.  No pacing: the caller decides when each one happens.
        Noise is not a message of any agent: the simulator must have ``noise_rate`` 0."""
        if self.noise_rate:
            raise ValueError("messages() needs noise_rate 0: noise lines belong to no agent")
        for line in self.lines(sys.maxsize if count is None else count, "envelope"):
            envelope = json.loads(line)
            yield envelope["source"], envelope["message"]

    def _emit(self, agent: _Agent, payload: str, fmt: str, record: bool = True) -> Iterator[str]:
        if record:
            agent.sent.append(payload)
            del agent.sent[:-50]
        self.clock += dt.timedelta(microseconds=self.rng.randint(1, 999))
        yield envelope_line(self.clock, agent.source, payload) if fmt == "envelope" else payload


def simulate(count: int, *, agents: int = 10, seed: int = 1, fmt: str = "envelope", **options) -> Iterator[str]:
    """``count`` notification lines from a seeded simulation (see ``Simulator``)."""
    return Simulator(agents=agents, seed=seed, **options).lines(count, fmt)
