"""Sending the worker's Celery task from asyncio, as Celery's own client would.

The dispatcher runs on an aio-pika connection; Celery's publisher blocks and waits
for each confirm in turn. This builds the very message Celery would (protocol 2,
by Celery's own `as_task_v2`) and publishes a whole batch at once on a confirming
channel, with the task-sent event that Flower shows. The events go on a second
channel without confirms: they are transient monitoring, as Celery's own events
are, and waiting for the broker to confirm each would only slow the tasks.
"""

import asyncio
import json
import os
import socket
from collections.abc import Sequence
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange
from celery import Celery
from celery.events import Event
from celery.utils.time import utcoffset
from kombu.clocks import LamportClock

from shared.jobs.messaging import RUN_JOB_TASK


class TaskSender:
    """Publishes the worker's task the way `Celery.send_task` would.

    The message is built by Celery itself (`as_task_v2`) and goes, persistent,
    to the exchange and routing key of the jobs queue as the Celery app declares
    it; the task-sent event goes to Celery's event exchange, transient, as a
    client with `task_send_sent_event` would send it.
    """

    def __init__(self, celery: Celery, queue: str) -> None:
        self.celery = celery
        self.queue = celery.amqp.queues[queue]
        self.hostname = f"dispatcher@{socket.gethostname()}"
        self.clock = LamportClock()
        self._channel: AbstractChannel | None = None
        self._tasks: AbstractExchange | None = None
        self._events: AbstractExchange | None = None

    async def open(self, connection: AbstractConnection) -> None:
        """Declare the jobs queue as the worker does, on a confirming channel;
        the event exchange on a channel of its own, without confirms."""
        channel = self._channel = await connection.channel(publisher_confirms=True)
        exchange = self.queue.exchange
        self._tasks = await channel.declare_exchange(
            exchange.name, aio_pika.ExchangeType(exchange.type), durable=True
        )
        queue = await channel.declare_queue(self.queue.name, durable=True)
        await queue.bind(self._tasks, self.queue.routing_key)
        events = await connection.channel(publisher_confirms=False)
        self._events = await events.declare_exchange(
            self.celery.conf.event_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )

    async def waiting(self) -> int:
        """How many tasks wait in the jobs queue, not yet taken by a worker."""
        if self._channel is None:
            raise ConnectionError("the task sender is not connected")
        queue = await self._channel.declare_queue(self.queue.name, passive=True)
        return int(queue.declaration_result.message_count or 0)

    async def send(self, tasks: Sequence[dict[str, Any]]) -> None:
        """Publish every task (and its task-sent event); return once all are
        confirmed by the broker."""
        if self._tasks is None or self._events is None:
            raise ConnectionError("the task sender is not connected")
        publishes = []
        for task in tasks:
            message = self.celery.amqp.as_task_v2(
                task["task_id"],
                RUN_JOB_TASK,
                args=[task["job_id"]],
                kwargs={},
                eta=task["eta"],
                create_sent_event=True,
            )
            publishes.append(
                self._tasks.publish(
                    aio_pika.Message(
                        json.dumps(message.body).encode(),
                        content_type="application/json",
                        content_encoding="utf-8",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        priority=0,
                        headers=message.headers,
                        **message.properties,
                    ),
                    self.queue.routing_key,
                    timeout=30,
                )
            )
            publishes.append(self._publish_sent_event(message.sent_event))
        await asyncio.gather(*publishes)

    async def _publish_sent_event(self, fields: dict[str, Any]) -> None:
        assert self._events is not None
        event = Event(
            "task-sent",
            hostname=self.hostname,
            utcoffset=utcoffset(),
            pid=os.getpid(),
            clock=self.clock.forward(),
            queue=self.queue.name,
            exchange=self.queue.exchange.name,
            routing_key=self.queue.routing_key,
            **fields,
        )
        await self._events.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                content_encoding="utf-8",
                delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                headers={"hostname": self.hostname},
            ),
            "task.sent",
            # Nobody may be listening (Flower not running): then the event is
            # dropped, as Celery's own are, instead of returned to the sender.
            mandatory=False,
            timeout=30,
        )
