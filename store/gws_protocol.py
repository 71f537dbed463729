"""The names GWS (Genesys Web Services, API v2) gives to what an ingesting client meets: one place
for the live client (``ingest/``), the simulated server (``gws_simulator*``) and the simulated
stream (``simulate.py``).  Each is what GWS documents; where it comes from is said next to it.
"""

from __future__ import annotations

# The CometD channel of an agent's workitem notifications (GWS "Workitem Notifications":
# WorkitemStateChangeMessage on /v2/me/workitems).
CHANNEL = "/v2/me/workitems"

# The CometD endpoint under the GWS URL (GWS "Notifications": POST /api/v2/notifications).
NOTIFICATIONS_PATH = "/api/v2/notifications"
# The authenticated user's resource; where CSRF protection is on, its answer names the token
# (GWS "CSRF protection").
ME_PATH = "/api/v2/me"
# The agent's current workitems (GWS "Recovering Existing State").
ME_WORKITEMS_PATH = "/api/v2/me/workitems"
# ... with every field: what a session stores as its snapshot after each handshake.
SNAPSHOT_PATH = ME_WORKITEMS_PATH + "?fields=*"
# Single resources, as their ``uri`` fields name them.
WORKITEMS_PATH = "/api/v2/workitems"
USERS_PATH = "/api/v2/users"

# CSRF (GWS "CSRF protection"): a GET answers ``X-CSRF-HEADER: <header name>`` and
# ``<header name>: <token>``; every POST then carries that header.  GWS names X-CSRF-TOKEN.
CSRF_HEADER_NAME_HEADER = "X-CSRF-HEADER"
CSRF_TOKEN_HEADER = "X-CSRF-TOKEN"
CSRF_ERROR = "Missing or invalid Csrf token"  # the statusMessage of GWS's 403 for a missing token
CSRF_REFUSED = "csrf token"  # what a client looks for in a 403 body, case-insensitively

# GWS error bodies, ``{"statusCode": N, "statusMessage": ...}`` (GWS "Return Values").
ACCESS_DENIED = "Access denied"  # the statusMessage of GWS's 401
NOT_AUTHENTICATED = 20  # statusCode: the user is not authenticated
