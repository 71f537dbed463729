"""The simulated agents of the GWS simulator (store/gws_simulator.py): each one's user resource
and current workitems, as GWS answers them.

- ``GET /api/v2/me``: the agent's user resource, ``{"statusCode": 0, "user": {...}}`` (GWS
  "Interpreting a Response").
- ``GET /api/v2/me/workitems?fields=*``: ``{"statusCode": 0, "workitems": [...]}``, the agent's
  current workitem resources (``id``, ``state``, ``capabilities``, ``workitemType``, ``uri``,
  ``userData``, ``receivedDate`` like ``2026-11-02 08:00:04.801+0000``), the read of GWS's
  "Recovering Existing State" page (resource shape: "Workitem Resource"; collection shape:
  "Return Values": a collection of resources under the resource's plural name, a collection of
  URIs under ``uris`` when no ``fields`` are asked for; ``fields=a,b`` keeps those fields).
  It follows every message the publisher hands to the agent, delivered or lost: StatusChange
  and PropertiesUpdated merge the workitem's fields into the agent's resource, a state of
  Completed or Revoked removes it, Error changes nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import secrets

from .gws_protocol import USERS_PATH

FINAL_STATES = ("Completed", "Revoked")  # a workitem in these leaves the agent's list
_RESOURCE_KEYS = ("id", "state", "capabilities", "workitemType", "uri", "userData", "receivedDate")


@dataclasses.dataclass
class SimulatedAgent:
    """One agent: its user name (``agent-001``), a user id, and its current workitems."""

    name: str
    user_id: str = dataclasses.field(default_factory=lambda: secrets.token_hex(16))
    workitems: dict[str, dict] = dataclasses.field(default_factory=dict)  # id -> current resource

    def user_json(self, base: str) -> dict:
        """The body of ``GET /api/v2/me``; ``base`` is the server's URL."""
        number = self.name.rsplit("-", 1)[-1]
        return {"statusCode": 0, "user": {
            "id": self.user_id, "userName": self.name, "firstName": "Agent", "lastName": number,
            "roles": ["ROLE_AGENT"], "enabledChannels": ["workitem"], "changedBy": "simulator",
            "uri": f"{base}{USERS_PATH}/{self.user_id}", "path": f"/users/{self.user_id}"}}

    def current_workitems(self) -> list[dict]:
        """The current workitem resources, in the order they arrived; copies."""
        return [copy.deepcopy(resource) for resource in self.workitems.values()]

    def workitems_json(self, fields: str | None) -> dict:
        """The body of ``GET /api/v2/me/workitems`` with the ``fields`` query parameter."""
        resources = self.current_workitems()
        if fields is None:  # GWS "Return Values": a collection without fields is one of URIs
            return {"statusCode": 0, "uris": [r.get("uri") for r in resources]}
        if fields.strip() != "*":
            wanted = {f.strip() for f in fields.split(",")} | {"id"}
            resources = [{k: v for k, v in r.items() if k in wanted} for r in resources]
        return {"statusCode": 0, "workitems": resources}

    def follow(self, message: dict, received: dt.datetime) -> None:
        """A message published to this agent changes its workitems (delivered or not)."""
        data = message.get("data")
        if not isinstance(data, dict) or data.get("notificationType") not in ("StatusChange", "PropertiesUpdated"):
            return  # Error notifications change no workitem
        workitem = data.get("workitem")
        if not isinstance(workitem, dict) or not isinstance(workitem.get("id"), str):
            return
        wid = workitem["id"]
        resource = self.workitems.get(wid) or {"receivedDate": _gws_date(received)}
        resource = {**resource, **copy.deepcopy(workitem)}
        if resource.get("state") in FINAL_STATES:
            self.workitems.pop(wid, None)
        else:
            self.workitems[wid] = _resource_order(resource)


def _gws_date(when: dt.datetime) -> str:
    """GWS's date format: ``2026-11-02 08:00:04.801+0000``."""
    return f"{when:%Y-%m-%d %H:%M:%S}.{when.microsecond // 1000:03d}{when:%z}"


def _resource_order(resource: dict) -> dict:
    ordered = {key: resource[key] for key in _RESOURCE_KEYS if key in resource}
    return ordered | {key: value for key, value in resource.items() if key not in ordered}
