"""rhio_client: talk to a rhio node from Python.

Signing and verification are the Rust ``rhio-client`` crate's (this package wraps it): list the
dataset versions in a cluster, fetch one from the cluster's S3 verified against its signed
manifest, read it as a ``pyarrow.Table``, verify a file against a signed manifest file, import
Parquet files, publish messages and follow routed ones with their provenance checked, and see
the cluster's state (peers, datasets, transfers) as ``pyarrow.Table``s.

    >>> import rhio_client
    >>> client = rhio_client.Client("nats://127.0.0.1:4222", s3_endpoint="http://127.0.0.1:9000",
    ...                             s3_access_key="...", s3_secret_key="...")
    >>> table = client.read_dataset("weather")            # latest version, verified
    >>> for message in client.subscribe("announcements.>"):
    ...     print(message.subject, message.author, message.verified)

Every blocking call releases the GIL; each has an ``async`` twin (``await
client.read_dataset_async("weather")``) that runs it in a worker thread, and a subscription is
both an iterator and an async iterator. Errors are :class:`RhioError` subclasses carrying the
client's error ``code``.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional

from . import _rhio_client

__all__ = [
    "Client",
    "DatasetVersion",
    "Message",
    "Subscription",
    "verify",
    "verify_async",
    "RhioError",
    "ConnectError",
    "NoNodeError",
    "NotFoundError",
    "AmbiguousError",
    "UsageError",
    "StorageError",
    "VerificationError",
]


class RhioError(Exception):
    """An error of rhio-client; ``code`` is stable and machine-readable."""

    code = "error"

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class ConnectError(RhioError):
    """NATS could not be reached."""


class NoNodeError(RhioError):
    """No rhio node answers on the cluster's NATS."""


class NotFoundError(RhioError):
    """No such dataset or version."""


class AmbiguousError(RhioError):
    """Several authors have the dataset: pass ``author=``."""


class UsageError(RhioError):
    """A missing or wrong argument (no S3 endpoint, credentials, a foreign bucket)."""


class StorageError(RhioError):
    """The cluster's S3 failed."""


class VerificationError(RhioError):
    """A signature, manifest or file hash did not verify; nothing was written."""


_ERRORS = {
    "connect": ConnectError,
    "no_node": NoNodeError,
    "not_found": NotFoundError,
    "ambiguous": AmbiguousError,
    "usage": UsageError,
    "s3": StorageError,
    "verification": VerificationError,
}


def _call(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except _rhio_client.RhioError as err:
        code, message = err.args
        raise _ERRORS.get(code, RhioError)(code, message) from None


@dataclass(frozen=True)
class DatasetVersion:
    """One dataset version available in the cluster, as its node announced it."""

    dataset: str
    version: int
    author: str
    file_hash: str
    rows: int
    row_groups: int
    bytes: int
    location: str
    created_at_micros: int
    operation: str
    subject: str
    problem: Optional[str] = None

    @property
    def verified(self) -> bool:
        """True when the announcement's signed operation header verifies."""
        return self.problem is None


@dataclass(frozen=True)
class Message:
    """A message as a subscriber sees it, with its provenance checked."""

    subject: str
    headers: list[tuple[str, str]]
    payload: bytes
    verified: bool
    author: Optional[str] = None
    seq: Optional[int] = None
    operation: Optional[str] = None
    timestamp_micros: Optional[int] = None
    error: Optional[str] = None
    #: Verified, and from one of the subscription's ``trusted`` authors (any author when none
    #: were given).
    trusted: bool = False
    raw: dict = field(default_factory=dict, repr=False)


class Subscription:
    """Messages on a subject: iterate (blocking) or ``async for``; ``close()`` stops it."""

    def __init__(self, native, trusted: Optional[list[str]] = None):
        self._native = native
        self._trusted = set(trusted) if trusted is not None else None

    def next(self, timeout: float = 0.5) -> Optional[Message]:
        """The next message, or None when none came within ``timeout`` seconds."""
        item = _call(self._native.next, timeout)
        if item is None:
            return None
        subject, headers, payload, provenance = item
        proof = json.loads(provenance)
        return Message(
            subject=subject,
            headers=[tuple(h) for h in headers],
            payload=payload,
            verified=proof["verified"],
            author=proof.get("author"),
            seq=proof.get("seq"),
            operation=proof.get("operation"),
            timestamp_micros=proof.get("timestamp_micros"),
            error=proof.get("error"),
            trusted=proof["verified"]
            and (self._trusted is None or proof.get("author") in self._trusted),
            raw=proof,
        )

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        # Short waits, so Ctrl-C is handled between them.
        while True:
            message = self.next(0.5)
            if message is not None:
                return message

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        while True:
            message = await asyncio.to_thread(self.next, 0.5)
            if message is not None:
                return message

    def close(self) -> None:
        self._native.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Client:
    """A connection to a rhio node's cluster: its NATS, and its S3 for fetching datasets.

    ``s3_*`` are the node's ``[s3]`` settings (needed by ``fetch`` and ``read_dataset`` only);
    ``dataset_stream`` is the node's ``datasets.stream``.
    """

    def __init__(
        self,
        nats_url: str = "nats://127.0.0.1:4222",
        *,
        s3_endpoint: Optional[str] = None,
        s3_bucket: str = "rhio",
        s3_access_key: Optional[str] = None,
        s3_secret_key: Optional[str] = None,
        dataset_stream: str = "DATASETS",
    ):
        self._native = _call(
            _rhio_client.Client,
            nats_url,
            s3_endpoint,
            s3_bucket,
            s3_access_key,
            s3_secret_key,
            dataset_stream,
        )

    def status(self) -> dict[str, Any]:
        """The node's status (the JSON of ``GET /health``)."""
        return json.loads(_call(self._native.status))

    def import_file(
        self,
        path: str,
        *,
        dataset: Optional[str] = None,
        subject: Optional[str] = None,
        timeout: float = 3600.0,
    ) -> dict[str, Any]:
        """Asks the node to import a Parquet file (under its import roots, or ``s3://``).

        Returns the node's answer; a refused import raises :class:`RhioError` with the node's
        code (``not_found``, ``forbidden_path``, ``too_large``, ``busy``, ...).
        """
        answer = json.loads(_call(self._native.import_file, path, dataset, subject, timeout))
        if not answer.get("ok"):
            error = answer.get("error", {})
            code = error.get("code", "error")
            raise _ERRORS.get(code, RhioError)(code, error.get("message", str(answer)))
        return answer

    def publish(
        self, subject: str, payload: bytes | str, *, headers: Optional[dict[str, str]] = None
    ) -> int:
        """Publishes into the cluster's JetStream; returns the stream sequence."""
        if isinstance(payload, str):
            payload = payload.encode()
        return _call(self._native.publish, subject, payload, list((headers or {}).items()))

    def datasets(self) -> list[DatasetVersion]:
        """Every dataset version announced in the cluster, oldest first (all authors)."""
        return [DatasetVersion(**v) for v in json.loads(_call(self._native.datasets))]

    def fetch(
        self,
        dataset: str,
        path: str | os.PathLike,
        *,
        version: Optional[int] = None,
        author: Optional[str] = None,
    ) -> dict[str, Any]:
        """Fetches a version (the latest by default) into ``path``, verified; nothing is left
        at ``path`` when verification fails (:class:`VerificationError`)."""
        return json.loads(
            _call(self._native.fetch, dataset, os.fspath(path), version, author)
        )

    def read_dataset(
        self, name: str, version: Optional[int] = None, author: Optional[str] = None
    ):
        """Fetches, verifies and reads a dataset version as a ``pyarrow.Table``.

        The verified file is read with pyarrow (which reads Parquet into Arrow memory without
        another copy and supports every encoding); the temporary file is removed afterwards.
        """
        import pyarrow.parquet as pq

        with tempfile.TemporaryDirectory(prefix="rhio-") as tmp:
            path = os.path.join(tmp, f"{name}.parquet")
            self.fetch(name, path, version=version, author=author)
            return pq.read_table(path, memory_map=False)

    def cluster_state(self) -> dict[str, Any]:
        """The cluster's state as ``pyarrow.Table``s: ``peers``, ``datasets``, ``transfers``
        (columns documented in the README, "Clients")."""
        import pyarrow.ipc

        return {
            name: pyarrow.ipc.open_stream(data).read_all()
            for name, data in _call(self._native.cluster_state)
        }

    def subscribe(self, subject: str, *, trusted: Optional[list[str]] = None) -> Subscription:
        """Follows messages on ``subject`` (wildcards allowed), each with its provenance.

        With ``trusted`` (authors' public keys, hex), ``Message.trusted`` says whether a verified
        message comes from one of them."""
        return Subscription(_call(self._native.subscribe, subject), trusted)

    # async twins: the blocking call in a worker thread (the GIL is released inside).
    async def status_async(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.status)

    async def import_file_async(self, path: str, **kwargs) -> dict[str, Any]:
        return await asyncio.to_thread(self.import_file, path, **kwargs)

    async def publish_async(self, subject: str, payload: bytes | str, **kwargs) -> int:
        return await asyncio.to_thread(self.publish, subject, payload, **kwargs)

    async def datasets_async(self) -> list[DatasetVersion]:
        return await asyncio.to_thread(self.datasets)

    async def fetch_async(self, dataset: str, path: str | os.PathLike, **kwargs) -> dict[str, Any]:
        return await asyncio.to_thread(self.fetch, dataset, path, **kwargs)

    async def read_dataset_async(self, name: str, **kwargs):
        return await asyncio.to_thread(self.read_dataset, name, **kwargs)

    async def cluster_state_async(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.cluster_state)


def verify(file: str | os.PathLike, manifest: str | os.PathLike) -> dict[str, Any]:
    """Checks a file against a signed manifest file (the ``.rhio-manifest`` a registry pull
    gives): signature, then size and BLAKE3. Raises :class:`VerificationError` otherwise."""
    return json.loads(_call(_rhio_client.verify, os.fspath(file), os.fspath(manifest)))


async def verify_async(file: str | os.PathLike, manifest: str | os.PathLike) -> dict[str, Any]:
    return await asyncio.to_thread(verify, file, manifest)
