"""Retry classes and backoff for backing reads (the seeds' StreamingRetryManager).

Errors are classified by errno:

* FILE_SYSTEM (EINTR, EAGAIN, EBUSY, EIO, ENOMEM, EMFILE, ENFILE): 3 attempts,
  1 s base delay, x2, at most 5 s;
* NETWORK (ETIMEDOUT, ESTALE, ENOTCONN, ECONNRESET, EHOSTUNREACH, ENETUNREACH,
  EREMOTEIO): 5 attempts, 500 ms, x1.5, at most 10 s;
* MEMORY (ENOMEM also asks the caller to shed memory before retrying);
* everything else (EACCES, EPERM, ENOENT, ...) fails at once with its errno.

Delays get +-25 % jitter; a per-read deadline bounds the whole retrying. Pure
decisions here; the engine sleeps (so trio's MockClock makes tests instant).
"""

from __future__ import annotations

import dataclasses
import errno
import random


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    name: str
    attempts: int
    base_delay_s: float
    multiplier: float
    max_delay_s: float

    def delay_s(self, retry: int, rng: random.Random | None = None,
                jitter: float | None = None) -> float:
        """Delay before retry number *retry* (1-based), with +-*jitter* (a fraction)."""
        delay = min(self.max_delay_s, self.base_delay_s * self.multiplier ** (retry - 1))
        spread = JITTER if jitter is None else jitter
        return max(0.0, delay * (1 + ((rng or random).uniform(-spread, spread) if spread else 0.0)))

    @classmethod
    def parse(cls, name: str, text: str) -> RetryPolicy:
        """``ATTEMPTS:BASE_S:MULTIPLIER:MAX_S`` (e.g. ``5:0.5:1.5:10``); ValueError if bad."""
        parts = text.split(":")
        if len(parts) != 4:
            raise ValueError("expected ATTEMPTS:BASE_SECONDS:MULTIPLIER:MAX_SECONDS")
        attempts, base, multiplier, max_delay = int(parts[0]), *map(float, parts[1:])
        if not (1 <= attempts <= 100 and 0 <= base <= 3600 and 1 <= multiplier <= 100
                and 0 <= max_delay <= 3600):
            raise ValueError("attempts 1-100, delays 0-3600 s, multiplier 1-100")
        return cls(name, attempts, base, multiplier, max_delay)

    def spec(self) -> str:
        return f"{self.attempts}:{self.base_delay_s:g}:{self.multiplier:g}:{self.max_delay_s:g}"


JITTER = 0.25
FILE_SYSTEM = RetryPolicy("file_system", 3, 1.0, 2.0, 5.0)
NETWORK = RetryPolicy("network", 5, 0.5, 1.5, 10.0)
NO_RETRY = RetryPolicy("permanent", 1, 0.0, 1.0, 0.0)
READ_DEADLINE_S = 30.0
"""No read retries past this long after its first attempt."""

_FILE_SYSTEM_ERRNOS = frozenset({errno.EINTR, errno.EAGAIN, errno.EBUSY, errno.EIO,
                                 errno.ENOMEM, errno.EMFILE, errno.ENFILE})
_NETWORK_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ESTALE, errno.ENOTCONN, errno.ECONNRESET,
                             errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EREMOTEIO})


REOPEN_ERRNOS = frozenset({errno.ESTALE, errno.EBADF})
"""Errors after which the file is reopened (and its identity checked) before a retry."""


@dataclasses.dataclass(frozen=True)
class RetrySettings:
    """The configurable side of retrying (``--retry-file-system`` and friends)."""

    file_system: RetryPolicy = FILE_SYSTEM
    network: RetryPolicy = NETWORK
    jitter: float = JITTER
    deadline_s: float = READ_DEADLINE_S

    def policy_for(self, err: int | None) -> RetryPolicy:
        """The retry policy of a backing errno."""
        if err in _NETWORK_ERRNOS or err == errno.EBADF:
            return self.network
        if err in _FILE_SYSTEM_ERRNOS:
            return self.file_system
        return NO_RETRY

    def delay_s(self, policy: RetryPolicy, retry: int, rng: random.Random | None = None) -> float:
        return policy.delay_s(retry, rng, self.jitter)


DEFAULT_SETTINGS = RetrySettings()


def policy_for(err: int | None) -> RetryPolicy:
    """The default retry policy of a backing errno."""
    return DEFAULT_SETTINGS.policy_for(err)


def sheds_memory(err: int | None) -> bool:
    """ENOMEM: free what the engine can (cache, read-ahead) before retrying."""
    return err == errno.ENOMEM
