"""The loop of every consumer of a RabbitMQ queue here: batches, acks, idle time.

Deliveries go to an inbox; whatever has arrived is handled as one batch, and the
batch is acknowledged (`multiple`) once it was handled, so a crash leaves it to
be delivered again. While nothing arrives, the consumer is told so every
IDLE_TICK_S, with the count of idle ticks in a row, for its housekeeping
(catching up from the store, saving a checkpoint).
A connection the broker dropped ends the loop with an error, so the caller
reconnects.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, AbstractQueue

from projectors.relay import raise_if_disconnected

IDLE_TICK_S = 0.5
# The events of one append arrive back to back, each delivery a few tasks deep
# in aio-pika: this many turns of the loop let them land, to handle them as one.
COALESCE_TURNS = 4


async def consume_in_batches(
    connection: AbstractConnection,
    queue: AbstractQueue,
    stopping: asyncio.Event,
    *,
    batch_size: int,
    handle: Callable[[Sequence[AbstractIncomingMessage]], Awaitable[None]],
    idle: Callable[[int], Awaitable[None]],
    consuming: asyncio.Event,
) -> None:
    """Handle what `queue` delivers, a batch at a time, until `stopping` is set.

    `idle` gets the number of idle ticks in a row, every IDLE_TICK_S while
    nothing comes.
    """
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def deliver(message: AbstractIncomingMessage) -> None:
        inbox.put_nowait(message)

    await queue.consume(deliver, no_ack=False)
    consuming.set()
    idle_ticks = 0
    while not stopping.is_set():
        raise_if_disconnected(connection)
        try:
            first = await asyncio.wait_for(inbox.get(), IDLE_TICK_S)
        except TimeoutError:
            idle_ticks += 1
            await idle(idle_ticks)
            continue
        idle_ticks = 0
        for _ in range(COALESCE_TURNS):
            await asyncio.sleep(0)
        batch = [first]
        while len(batch) < batch_size and not inbox.empty():
            batch.append(inbox.get_nowait())
        await handle(batch)
        last = max(batch, key=lambda message: message.delivery_tag or 0)
        await last.ack(multiple=True)


def every(seconds: float, idle_ticks: int) -> bool:
    """Whether `seconds` of idleness have passed again at this idle tick."""
    return idle_ticks % max(1, round(seconds / IDLE_TICK_S)) == 0
