"""What live ingest connects to: GWS sessions from the command line or a TOML file, TLS, proxies.

Credentials live only in memory: they are never logged, never stored and never on a command
line (passwords come from environment variables).
"""

from __future__ import annotations

import math
import os
import ssl
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..db import StoreError
from ..gws_protocol import NOTIFICATIONS_PATH
from ..notifications import MAX_KEY_BYTES
from ..seals import Sealing

MAX_SOURCE_BYTES = 256  # leaves room in a session id for the instance and the session number
# Keys a session may set in the config file, each also allowed at the top level as the default.
CONNECTION_KEYS = ("gws_url", "ca_file", "client_cert", "client_key", "proxy", "notifications_path")
# Store-wide keys, top level only: sealing the log's head (store/seals.py).
SEALING_KEYS = ("seal_key", "witness", "seal_every")
MIN_SEAL_EVERY = 0.1  # seconds, as --seal-every
# Store-wide too: the userData keys redacted before a row is first written (log.AppendContext).
REDACT_KEYS = "redact_keys"
REDACT_KEYS_ENV = "WORKITEM_STORE_REDACT_KEYS"  # comma-separated, as --redact-keys
STORE_KEYS = (*SEALING_KEYS, REDACT_KEYS)


@dataclass(frozen=True)
class SessionConfig:
    """One GWS session: whose notifications, read from where, stored under which source.

    ``ca_file``: PEM CA certificates to trust instead of the system's; ``client_cert`` and
    ``client_key``: a client certificate for TLS; ``proxy``: an HTTP proxy URL (else
    HTTPS_PROXY/HTTP_PROXY/NO_PROXY from the environment apply).
    """

    gws_url: str
    user: str
    password: str = field(repr=False)
    source: str | None = None  # default: the user name
    ca_file: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    proxy: str | None = field(default=None, repr=False)  # may carry credentials
    notifications_path: str = NOTIFICATIONS_PATH

    def __post_init__(self):
        if len(self.source_name.encode("utf-8", "surrogatepass")) > MAX_SOURCE_BYTES:
            raise StoreError(f"source {self.source_name[:40]!r}... is longer than {MAX_SOURCE_BYTES} bytes "
                             f"(a session id, <instance>/<source>/<n>, must stay within {MAX_KEY_BYTES})")

    @property
    def source_name(self) -> str:
        return self.source or self.user

    @property
    def notifications_url(self) -> str:
        return self.gws_url.rstrip("/") + "/" + self.notifications_path.lstrip("/")

    def url(self, path: str) -> str:
        return self.gws_url.rstrip("/") + path

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS settings of this session (None: aiohttp's defaults, the system's CAs).

        Raises StoreError naming the file when a CA file or client certificate cannot be used.
        """
        if not (self.ca_file or self.client_cert or self.client_key):
            return None
        if self.client_key and not self.client_cert:
            raise StoreError("a client key needs a client certificate (--client-cert)")
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise StoreError(f"cannot use the CA file {self.ca_file}: {_reason(exc)}") from exc
        if self.client_cert:
            try:
                context.load_cert_chain(self.client_cert, self.client_key)
            except (OSError, ssl.SSLError) as exc:
                raise StoreError(f"cannot use the client certificate {self.client_cert}"
                                 f"{' with the key ' + self.client_key if self.client_key else ''}: "
                                 f"{_reason(exc)}") from exc
        return context


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)


@dataclass(frozen=True)
class SealingConfig:
    """The config file's sealing keys (None: not set).  ``seal_key`` is the path of the key file,
    never the key itself."""

    seal_key: str | None = None
    witness: str | None = None
    seal_every: float | None = None


def password_from_env(var: str, where: str = "") -> str:
    """The password held by environment variable ``var``; StoreError if unset or empty."""
    value = os.environ.get(var)
    if not value:
        raise StoreError(f"environment variable {var} is not set or empty{where}")
    return value


def load_sessions(config_path: str | Path | None, *, gws_url: str | None = None, user: str | None = None,
                  password_env: str | None = None, source: str | None = None,
                  **connection: str | None) -> list[SessionConfig]:
    """The sessions of `ingest`: those of the config file ``config_path`` (with ``gws_url`` and
    ``connection``, i.e. ca_file, client_cert, client_key, proxy, notifications_path, as the
    defaults), else the one session of ``user`` whose password is in ``password_env``.  Each
    session's TLS settings are checked now: StoreError names a CA file or client certificate
    that cannot be used, before any session starts."""
    if config_path:
        sessions = load_config(config_path, gws_url=gws_url, **connection)
    else:
        if not (gws_url and user and password_env):
            raise StoreError("a session needs a GWS URL, a user and the variable holding its password")
        path = connection.pop("notifications_path", None) or NOTIFICATIONS_PATH
        sessions = [SessionConfig(gws_url, user, password_from_env(password_env), source, notifications_path=path,
                                  **connection)]
    for session in sessions:
        session.ssl_context()
    return sessions


def load_sealing_options(config_path: str | Path | None, seal_key: str | None = None, witness: str | None = None,
                         seal_every: float | None = None) -> Sealing | None:
    """The sealing of `ingest`: the options (and environment variables) win over the config
    file's keys (``load_sealing``); without a key anywhere, None: nothing is sealed."""
    in_file = load_sealing(config_path) if config_path else SealingConfig()
    return Sealing.configured(seal_key or in_file.seal_key, witness or in_file.witness,
                              seal_every or in_file.seal_every)


def load_config(path: str | Path, **defaults: str | None) -> list[SessionConfig]:
    """The sessions of a TOML file::

        gws_url = "https://gws.example.com"        # for every session unless it has its own
        ca_file = "/etc/ssl/gws-ca.pem"            # also client_cert, client_key, proxy,
                                                   # notifications_path: defaults for all
        [[sessions]]
        user = "agent1"
        password_env = "AGENT1_PW"                 # or password = "..." (plain text: avoid)
        source = "agent1"                          # optional; default the user name

    The top level may also hold the store-wide sealing keys (load_sealing) and ``redact_keys``
    (load_redact_keys), never a session.
    ``defaults`` (from command line options: gws_url, ca_file, ...) apply where the file sets
    nothing.  Users and sources must be unique.  Raises StoreError on anything missing or wrong.
    """
    path = Path(path)
    config = _read_toml(path)
    _sealing(config, path)  # (checked here too: a wrong seal_every is an error of the file)
    _redact_keys(config, path)
    top = {key: config.get(key, defaults.get(key)) for key in CONNECTION_KEYS}
    entries = config.get("sessions")
    if not isinstance(entries, list) or not entries:
        raise StoreError(f"{path}: no [[sessions]]")
    sessions = []
    for n, entry in enumerate(entries, 1):
        where = f" ({path}, session {n})"
        unknown = set(entry) - {"user", "password", "password_env", "source", *CONNECTION_KEYS}
        store_wide = sorted(unknown & set(STORE_KEYS))
        if store_wide:
            raise StoreError(f"{', '.join(store_wide)} apply to the whole store: set them at the top of the file, "
                             f"before any [[sessions]]{where}")
        if unknown:
            raise StoreError(f"unknown keys {', '.join(sorted(unknown))}{where}")
        user = entry.get("user")
        if not isinstance(user, str) or not user:
            raise StoreError(f"user is missing{where}")
        options = {key: entry.get(key, top[key]) for key in CONNECTION_KEYS}
        if not isinstance(options["gws_url"], str) or not options["gws_url"]:
            raise StoreError(f"gws_url is missing (top level or per session){where}")
        for key, value in options.items():
            if value is not None and (not isinstance(value, str) or not value):
                raise StoreError(f"{key} must be a non-empty string{where}")
        if ("password" in entry) == ("password_env" in entry):
            raise StoreError(f"give exactly one of password_env or password{where}")
        password = entry["password"] if "password" in entry else password_from_env(entry["password_env"], where)
        source = entry.get("source")
        if source is not None and (not isinstance(source, str) or not source):
            raise StoreError(f"source must be a non-empty string{where}")
        options["notifications_path"] = options["notifications_path"] or NOTIFICATIONS_PATH
        sessions.append(SessionConfig(user=user, password=str(password), source=source, **options))
    for what in ("user", "source_name"):
        seen = [getattr(s, what) for s in sessions]
        twice = sorted({v for v in seen if seen.count(v) > 1})
        if twice:
            raise StoreError(f"{path}: {what.removesuffix('_name')} given to several sessions: {', '.join(twice)}")
    return sessions


def load_sealing(path: str | Path) -> SealingConfig:
    """The sealing keys at the top of a config file (store-wide, never per session)::

        seal_key = "/etc/workitem-store/seal.key"  # the key FILE (`workitem-store keygen`)
        witness = "/mnt/worm/seals.jsonl"           # optional
        seal_every = 600                            # seconds, optional

    Options and environment variables win over these (the caller decides).  Raises StoreError
    on a file that cannot be read or a key of the wrong type.
    """
    path = Path(path)
    return _sealing(_read_toml(path), path)


def redact_keys(text: str | None) -> frozenset[str]:
    """The userData keys of ``--redact-keys`` (or $WORKITEM_STORE_REDACT_KEYS): comma-separated,
    blanks around each ignored; StoreError for an empty key between commas."""
    if text is None or not text.strip():
        return frozenset()
    keys = [key.strip() for key in text.split(",")]
    if not all(keys):
        raise StoreError(f"--redact-keys {text!r}: an empty key (give K1,K2,...)")
    return frozenset(keys)


def load_redact_keys(config_path: str | Path | None, option: str | None = None) -> frozenset[str]:
    """The keys redacted at ingest: ``option`` (--redact-keys, or the environment variable)
    wins over the config file's top-level ``redact_keys = ["K1", "K2"]``; none: nothing redacted."""
    if option is not None and option.strip():
        return redact_keys(option)
    if not config_path:
        return frozenset()
    path = Path(config_path)
    return _redact_keys(_read_toml(path), path)


def _redact_keys(config: dict, path: Path) -> frozenset[str]:
    keys = config.get(REDACT_KEYS, [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
        raise StoreError(f"{path}: {REDACT_KEYS} must be a list of non-empty strings (userData keys)")
    return frozenset(keys)


def _read_toml(path: Path) -> dict:
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise StoreError(f"{path}: not TOML: {exc}") from exc
    unknown = set(config) - {"sessions", *CONNECTION_KEYS, *STORE_KEYS}
    if unknown:
        raise StoreError(f"{path}: unknown top-level keys {', '.join(sorted(unknown))}")
    return config


def _sealing(config: dict, path: Path) -> SealingConfig:
    for key in ("seal_key", "witness"):
        value = config.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise StoreError(f"{path}: {key} must be a non-empty string (a file path)")
    every = config.get("seal_every")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int | float)
                              or not math.isfinite(every) or every < MIN_SEAL_EVERY):
        raise StoreError(f"{path}: seal_every must be a number of seconds, at least {MIN_SEAL_EVERY}")
    return SealingConfig(config.get("seal_key"), config.get("witness"),
                         None if every is None else float(every))
