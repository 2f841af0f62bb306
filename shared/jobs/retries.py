"""How long a job waits before its next attempt: exponential backoff, full jitter.

The n-th retry waits a random time in [base * 2**(n-1) / 2, base * 2**(n-1)],
capped at `cap_s`. Half the delay is fixed so retries never bunch up at zero;
the other half is random so that jobs that failed together do not retry together.
"""

import random


def retry_delay_s(
    retry: int, *, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """The wait before retry number `retry` (1 for the first retry)."""
    if retry < 1:
        raise ValueError("retries count from 1")
    ceiling = min(cap_s, base_s * 2.0 ** (retry - 1))
    jitter: float = (rng or random).uniform(0, ceiling / 2)
    return ceiling / 2 + jitter
