"""Sign-in throttling: too many failures for one email from one address.

The counts live in Redis, so every command API process shares them and a restart
of one does not reset them. A window opens with the first failure and lasts
`signin_failure_window_s`; once `signin_max_failures` attempts in it have failed,
sign-ins for that email from that address are refused until it closes.

Each attempt is counted before its password is verified and the count is cleared
when it succeeds, so parallel guesses cannot slip past the limit between a check
and an increment.
"""

import hashlib
import logging

import redis.asyncio as redis
from redis.exceptions import RedisError

from shared.errors import Throttled, Unavailable
from shared.settings import Settings

log = logging.getLogger(__name__)

KEY_PREFIX = "helix:signin-failures:"


class SignInThrottle:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.client = client
        self.max_failures = settings.signin_max_failures
        self.window_s = settings.signin_failure_window_s

    @staticmethod
    def key(email: str, client_address: str) -> str:
        # Hashed, so Redis holds no email address.
        digest = hashlib.sha256(f"{email}\n{client_address}".encode()).hexdigest()
        return KEY_PREFIX + digest

    async def attempt(self, email: str, client_address: str) -> int | None:
        """Count an attempt: None if it may go on, else seconds until it may."""
        key = self.key(email, client_address)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, ex=self.window_s, nx=True)
                pipe.incr(key)
                pipe.ttl(key)
                _, attempts, ttl = await pipe.execute()
        except RedisError as exc:
            raise Unavailable("Redis is unavailable") from exc
        if int(attempts) <= self.max_failures:
            return None
        return max(int(ttl), 1)

    async def succeeded(self, email: str, client_address: str) -> None:
        """Clear the count. Not fatal if Redis fails now: the attempt succeeded
        (and was recorded), and the count expires with its window anyway."""
        try:
            await self.client.delete(self.key(email, client_address))
        except RedisError as exc:
            log.warning(
                "could not clear a sign-in failure count", extra={"error": repr(exc)}
            )


class PasswordCheckThrottle:
    """The guesses at one account's password outside sign-in (`current_password`),
    counted per account from whichever address: a stolen token must not buy
    unlimited guesses."""

    def __init__(self, throttle: SignInThrottle, user_id: object) -> None:
        self.throttle = throttle
        self.key = f"current-password:{user_id}"

    async def attempt(self) -> None:
        """Count a guess about to be checked; raise Throttled past the limit."""
        retry_after_s = await self.throttle.attempt(self.key, "")
        if retry_after_s is not None:
            raise Throttled("too many wrong passwords; try again later", retry_after_s)

    async def passed(self) -> None:
        """The password was right: what came before were no guesses."""
        await self.throttle.succeeded(self.key, "")
