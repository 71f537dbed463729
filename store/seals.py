"""Seals: signed statements of the log's head, kept outside the store (docs/RULES.md section 9).

The only writer of ``seals``.  A seal says "store S's log held ``rows`` rows up to seq ``seq``,
whose chain_hash was ``chain_hash``, at ``sealed_at``", signed with an Ed25519 key.  Seals are
numbered ``n`` = 1, 2, ... per store and each names the digest of the one before (``prev``), so
a witness file with a line removed no longer links up.  Anyone holding the public key and a
seal can check a log, or one row of it (store/proofs.py), without trusting the database.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, Engine, select

from . import log
from .bulk import insert_rows
from .db import write_transaction
from .errors import StoreError
from .locks import lock_for_append, lock_seals
from .notifications import utc_text
from .schema import event_log, seals, store_identity

FORMAT = "workitem-store-seal/1"
NO_SEAL = "0" * 64  # ``prev`` of the first seal
KEY_ENV = "WORKITEM_STORE_SEAL_KEY"  # path of the private key (never the key itself)
WITNESS_ENV = "WORKITEM_STORE_WITNESS"
# How a seal's problem begins when the log's chain_hash at its seq is not the sealed one (rows
# up to it changed and re-chained); verify then says between which seqs the first change lies.
HEAD_DIFFERS = "the log no longer holds the sealed head"
FIELDS = ("store_id", "n", "seq", "chain_hash", "rows", "sealed_at", "witnessed", "prev", "key_id")


class SealError(StoreError):
    """A key or witness file that cannot be used; a seal that cannot be made."""


@dataclass(frozen=True)
class Seal:
    store_id: str
    n: int
    seq: int
    chain_hash: str
    rows: int
    sealed_at: str  # utc_text: YYYY-MM-DDTHH:MM:SS.ffffffZ
    witnessed: bool  # written to a witness file as well as to the seals table
    prev: str  # digest() of seal n - 1, NO_SEAL for n = 1
    key_id: str  # sha256 (hex) of the raw 32-byte public key
    signature: str = ""  # base64 of the Ed25519 signature of message()

    def message(self) -> bytes:
        """What is signed: the format name and the fields, each line ending in a newline."""
        values = [FORMAT, self.store_id, str(self.n), str(self.seq), self.chain_hash, str(self.rows),
                  self.sealed_at, "1" if self.witnessed else "0", self.prev, self.key_id]
        return "".join(value + "\n" for value in values).encode()

    def digest(self) -> str:
        """``prev`` of the next seal: sha256 (hex) of message()."""
        return hashlib.sha256(self.message()).hexdigest()

    def as_dict(self) -> dict:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    def line(self) -> str:
        """The seal as one line of JSON (the witness file's form, without the newline)."""
        return json.dumps(self.as_dict(), separators=(",", ":"))

    def signed_by(self, public_key: Ed25519PublicKey) -> bool:
        """The signature verifies with ``public_key`` and is in its one written form (base64
        decoding ignores the unused low bits of the last character: 'B' and 'C' there give
        the same bytes, and a changed byte must not pass)."""
        if self.key_id != key_id(public_key):
            return False
        try:
            signature = base64.b64decode(self.signature, validate=True)
            public_key.verify(signature, self.message())
        except (InvalidSignature, binascii.Error, ValueError):
            return False
        return base64.b64encode(signature).decode() == self.signature

    @classmethod
    def from_dict(cls, value) -> Seal:
        """A seal from its JSON object; ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError("not a JSON object")
        if value.get("format") != FORMAT:
            raise ValueError(f"format is {value.get('format')!r}, not {FORMAT!r}")
        expected = {"format", *FIELDS, "signature"}
        if set(value) != expected:
            raise ValueError(f"fields {sorted(set(value) ^ expected)} missing or unexpected")
        for name, kind in (("n", int), ("seq", int), ("rows", int), ("witnessed", bool)):
            if type(value[name]) is not kind:
                raise ValueError(f"{name} is not {'true/false' if kind is bool else 'an integer'}")
        for name in ("store_id", "chain_hash", "sealed_at", "prev", "key_id", "signature"):
            if not isinstance(value[name], str):
                raise ValueError(f"{name} is not text")
        return cls(**{name: value[name] for name in (*FIELDS, "signature")})

    @classmethod
    def from_line(cls, line: str) -> Seal:
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        return cls.from_dict(value)


# -- keys ------------------------------------------------------------------------------------------

def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def keygen(path: str | Path) -> tuple[Path, Path]:
    """A new Ed25519 key: the private key to ``path`` (PKCS#8 PEM, mode 0600, never overwritten),
    the public key to ``path``.pub (SubjectPublicKeyInfo PEM, what openssl reads)."""
    private_path, public_path = Path(path), Path(f"{path}.pub")
    for existing in (private_path, public_path):
        if existing.exists():
            raise SealError(f"{existing} exists: keygen never overwrites a key (choose another name)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, pem, 0o600)
    try:  # (O_EXCL: not even a file made meanwhile, or a symlink, is written through)
        _write_new(public_path, public_pem, 0o644)
    except SealError:
        private_path.unlink()  # no private key without its public key
        raise
    return private_path, public_path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write a file that does not exist yet (never an existing one, nor through a symlink)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:
        raise SealError(f"cannot write {path}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise SealError(f"cannot write {path}: {exc.strerror}") from exc


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SealError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key in ``path``; refused when other users can read the file (as ssh does)."""
    data = _read(path, "seal key")
    mode = Path(path).stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealError(f"the seal key {path} is readable by other users (mode {stat.filemode(mode)}): "
                        f"chmod 600 {path}")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SealError(f"{path} is not an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SealError(f"{path} is not an Ed25519 key (make one with `workitem-store keygen`)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SealError(f"{path} is not a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SealError(f"{path} is not an Ed25519 public key (`workitem-store keygen` writes KEYFILE.pub)")
    return key


# -- sealing ---------------------------------------------------------------------------------------

def store_id(conn: Connection) -> str:
    return conn.execute(select(store_identity.c.store_id)).scalar_one()


def table_seals(conn: Connection) -> list[Seal]:
    rows = conn.execute(select(seals).order_by(seals.c.n))
    return [Seal(**row._mapping) for row in rows]


def _last_seal(conn: Connection) -> Seal | None:
    row = conn.execute(select(seals).order_by(seals.c.n.desc()).limit(1)).first()
    return None if row is None else Seal(**row._mapping)


def seal(engine: Engine, key: Ed25519PrivateKey, witness: str | Path | None = None) -> Seal:
    """Sign the log's head; add the seal to the seals table and, with ``witness``, append it to
    that file (fsync'd) before the table's transaction commits."""
    with write_transaction(engine) as conn:
        lock_seals(conn)
        # Appenders wait for the seal: the head and the row count read below are of one moment.
        lock_for_append(conn)
        seq, chain_hash = log.head(conn)
        last = _last_seal(conn)
        if witness is not None:
            last = _adopt_orphan(conn, witness, last, key.public_key()) or last
        unsigned = Seal(
            store_id=store_id(conn), n=last.n + 1 if last else 1, seq=seq, chain_hash=chain_hash,
            rows=sum(n for *_, n in log.counts(conn)), sealed_at=utc_text(dt.datetime.now(dt.UTC)),
            witnessed=witness is not None, prev=last.digest() if last else NO_SEAL,
            key_id=key_id(key.public_key()),
        )
        made = dataclasses.replace(unsigned, signature=base64.b64encode(key.sign(unsigned.message())).decode())
        insert_rows(conn, seals, [dataclasses.asdict(made)])
        if witness is not None:
            append_witness(witness, made)
    return made


def _adopt_orphan(conn: Connection, witness: str | Path, last: Seal | None,
                  public_key: Ed25519PublicKey) -> Seal | None:
    """The witness file's last seal when it is the one a crashed ``seal`` wrote there but never
    committed to the table (the next number, linked to ``last``, signed with this key, of a head
    the log holds): it is added to the table as it is, and returned.  Otherwise None."""
    orphan = _witness_tail(witness)
    if orphan is None or orphan.n != (last.n + 1 if last else 1) or orphan.prev != (last.digest() if last else NO_SEAL):
        return None
    held = conn.execute(select(event_log.c.chain_hash).where(event_log.c.seq == orphan.seq)).scalar()
    if orphan.store_id != store_id(conn) or not orphan.signed_by(public_key) or \
            (held or log.GENESIS_HASH) != orphan.chain_hash:
        return None
    insert_rows(conn, seals, [dataclasses.asdict(orphan)])
    return orphan


def _witness_tail(path: str | Path) -> Seal | None:
    """The last line of a witness file as a seal (None: no file, or not a seal)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None  # (append_witness reports what is wrong with the file)
    try:
        return Seal.from_line(lines[-1].decode()) if lines else None
    except (ValueError, UnicodeDecodeError):
        return None


def append_witness(path: str | Path, made: Seal) -> None:
    """Append one seal line to the witness file and fsync it (and its directory when the file is
    new, so that the file itself survives a crash)."""
    path = Path(path)
    new = not path.exists()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (made.line() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        if new:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise SealError(f"cannot append to the witness file {path}: {exc.strerror}") from exc


def read_witness(path: str | Path) -> tuple[list[Seal], list[str]]:
    """The seals of a witness file, and a problem for each line that is not one."""
    found, problems = [], []
    lines = _read(path, "witness file").decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            found.append(Seal.from_line(line))
        except ValueError as exc:
            problems.append(f"witness line {number} is not a seal: {exc}")
    return found, problems


@dataclass(frozen=True)
class Sealing:
    """Sealing configured for a command that writes the log (``import``, ``ingest``): the key,
    the witness file (None: the seals table only) and, for ``ingest``, the interval."""

    key: Ed25519PrivateKey
    witness: Path | None = None
    every: float = 600.0

    @classmethod
    def configured(cls, key_path: str | Path | None, witness: str | Path | None = None,
                   every: float | None = None) -> Sealing | None:
        """From what the command was given (options, environment variables, config file: the
        CLI resolves those); None when no key is configured (then nothing is sealed)."""
        if not key_path:
            if witness:
                raise SealError("a witness file is configured but no seal key: give --seal-key KEYFILE "
                                f"(or ${KEY_ENV})")
            return None
        return cls(load_private_key(key_path), Path(witness) if witness else None, every or cls.every)

    def seal(self, engine: Engine) -> Seal:
        return seal(engine, self.key, self.witness)
