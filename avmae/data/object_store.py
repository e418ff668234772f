"""Reading shards from an S3-compatible object store: errors told apart, passing faults retried.

boto3 raises one exception type for everything a server answers and others for the network; a
reader that turns them all into "not found" hides expired credentials, throttling and a reset
connection behind a missing-shard message. Here a missing object is a ``FileNotFoundError``,
refused credentials an ``ObjectStoreAccessError``, passing faults are retried (``POLICY``) and
counted, then ``ObjectStoreUnavailable``; anything else is raised as it is. ``client_config()``
turns botocore's own retries off for litdata's client, so these rules see every failure.
docs/data.md, "Object stores: errors and retries".
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

MISSING = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
ACCESS = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
          "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem", "InvalidSecurity"}  # fmt: skip
TRANSIENT = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
             "RequestTimeout", "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "BadGateway",
             "GatewayTimeout", "429", "500", "502", "503", "504"}  # fmt: skip


class ObjectStoreAccessError(PermissionError):
    """The store refused the request: credentials missing, wrong or expired, or no permission."""


class ObjectStoreUnavailable(OSError):
    """A passing fault (throttling, a 5xx, a timeout, a reset) that went on past every retry."""


@dataclasses.dataclass
class RetryPolicy:
    attempts: int = 6  # tries per request, the first included
    base_delay_s: float = 0.5  # backoff: base x 2^retry, times a jitter in [0.5, 1], at most max_delay_s
    max_delay_s: float = 20.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


POLICY = RetryPolicy()


def new_counter() -> torch.Tensor:
    """A retry count shared with DataLoader workers (shared memory, made before they start)."""
    return torch.zeros(1, dtype=torch.int64).share_memory_()


def client_config():
    """botocore settings for a client whose failures ``call`` handles: no retries of its own, finite timeouts."""
    from botocore.config import Config

    return Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=POLICY.connect_timeout_s,
                  read_timeout=POLICY.read_timeout_s)  # fmt: skip


def _code_status(response: dict) -> tuple[str, str]:
    """The error code and the HTTP status of a botocore error response ("" when absent)."""
    code = str(response.get("Error", {}).get("Code") or "")
    status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or "")
    return code, status


def _code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    if not isinstance(response, dict):
        return None
    code, status = _code_status(response)
    return code or status or None


def classify(err: BaseException) -> str:
    """``missing``, ``access``, ``transient`` or ``other`` (see the module doc)."""
    import botocore.exceptions as bex

    if isinstance(err, bex.ClientError):
        code, status = _code_status(err.response)
        for kind, codes in (("missing", MISSING), ("access", ACCESS), ("transient", TRANSIENT)):
            if code in codes or (not code and status in codes):
                return kind
        return "transient" if status.startswith("5") else "other"
    if isinstance(err, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.CredentialRetrievalError)):
        return "access"
    if isinstance(err, (bex.HTTPClientError, bex.ResponseStreamingError, bex.IncompleteReadError,
                        ConnectionError, TimeoutError)):  # fmt: skip
        return "transient"  # connection refused, reset or closed; connect and read timeouts
    if isinstance(err, OSError) and "Short range read" in str(err):  # litdata: a body cut short
        return "transient"
    return "other"


def call(fn: Callable[[], T], url: str | Callable[[], str], counter: torch.Tensor | None = None) -> T:
    """``fn()``, its object-store errors classified, the passing ones retried and counted in ``counter``.

    ``url`` names what ``fn`` reads in the errors and warnings; a callable is asked only when
    something fails (the per-sample reads of shards need no name otherwise)."""
    for attempt in range(POLICY.attempts):
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - classified below, re-raised when not the store's
            kind = classify(err)
            if callable(url):
                url = url()
            code = _code(err) or type(err).__name__
            if kind == "missing":
                raise FileNotFoundError(f"{url}: no such object in the store ({code})") from err
            if kind == "access":
                raise ObjectStoreAccessError(
                    f"{url}: the store refused access ({code}): check the credentials (AWS_ACCESS_KEY_ID, "
                    "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, expiry) and the permissions on the bucket"
                ) from err
            if kind != "transient":
                raise
            if attempt + 1 == POLICY.attempts:
                raise ObjectStoreUnavailable(
                    f"{url}: the store kept failing, {POLICY.attempts} attempts ({code}: {err})"
                ) from err
            if counter is not None:
                counter += 1
            delay = min(POLICY.max_delay_s, POLICY.base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)
            log.warning("%s: %s (%s); retry %d of %d in %.1f s", url, code, err, attempt + 1, POLICY.attempts - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def store_retries(dataset) -> torch.Tensor | None:
    """The retry counter of a dataset read from an object store (``dataset.store.retries``), else None."""
    return getattr(getattr(dataset, "store", None), "retries", None)
