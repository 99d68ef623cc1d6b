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

    def delay_s(self, retry: int, rng: random.Random | None = None) -> float:
        """Delay before retry number *retry* (1-based), with jitter."""
        delay = min(self.max_delay_s, self.base_delay_s * self.multiplier ** (retry - 1))
        jitter = (rng or random).uniform(-JITTER, JITTER) if JITTER else 0.0
        return max(0.0, delay * (1 + jitter))


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


def policy_for(err: int | None) -> RetryPolicy:
    """The retry policy of a backing errno."""
    if err in _NETWORK_ERRNOS:
        return NETWORK
    if err in _FILE_SYSTEM_ERRNOS:
        return FILE_SYSTEM
    return NO_RETRY


def sheds_memory(err: int | None) -> bool:
    """ENOMEM: free what the engine can (cache, read-ahead) before retrying."""
    return err == errno.ENOMEM
