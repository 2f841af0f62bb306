"""Sign-in throttling: too many failures for one email from one address.

The counts live in Redis, so every command API process shares them and a restart
of one does not reset them. A window opens with the first failure and lasts
`signin_failure_window_s`; after `signin_max_failures` failures in it, sign-ins
for that email from that address are refused until it closes.
"""

import hashlib

import redis.asyncio as redis
from redis.exceptions import RedisError

from shared.errors import Unavailable
from shared.settings import Settings

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

    async def retry_after(self, email: str, client_address: str) -> int | None:
        """Seconds until sign-in may be tried again, or None if it may now."""
        key = self.key(email, client_address)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.ttl(key)
                count, ttl = await pipe.execute()
        except RedisError as exc:
            raise Unavailable("Redis is unavailable") from exc
        if count is None or int(count) < self.max_failures:
            return None
        return max(int(ttl), 1)

    async def record_failure(self, email: str, client_address: str) -> None:
        key = self.key(email, client_address)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, 0, ex=self.window_s, nx=True)
                pipe.incr(key)
                await pipe.execute()
        except RedisError as exc:
            raise Unavailable("Redis is unavailable") from exc

    async def clear(self, email: str, client_address: str) -> None:
        try:
            await self.client.delete(self.key(email, client_address))
        except RedisError as exc:
            raise Unavailable("Redis is unavailable") from exc
