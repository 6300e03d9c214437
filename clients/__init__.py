"""Herald client library: durable publish/subscribe over ZeroMQ.

Blocking::

    from clients import Client

    with Client("tcp://127.0.0.1:5555") as client:
        client.create_topic("orders", exist_ok=True)
        message_id = client.publish("orders", b"hello", {"region": "eu"})
        with client.subscribe("orders", "billing") as subscription:
            for message in subscription:
                handle(message.data)
                message.ack()

asyncio (``clients.aio.run`` uses uvloop when installed)::

    from clients import AsyncClient
    from clients.aio import run

    async def main() -> None:
        async with AsyncClient() as client:
            ids = await asyncio.gather(*(client.publish("orders", b"x") for _ in range(10_000)))
            async with client.subscribe("orders", "billing") as subscription:
                async for message in subscription:
                    await message.ack()

    run(main())
"""

from clients._core import AsyncMessage, ClientStatistics, CurveKeys, Message, PublishId, SubscriptionStatistics
from clients.aio import AsyncClient, AsyncSubscription
from clients.client import Client, Subscription
from clients.protocol import HeraldError, ProtocolError

__all__ = [
    "AsyncClient",
    "AsyncMessage",
    "AsyncSubscription",
    "Client",
    "ClientStatistics",
    "CurveKeys",
    "HeraldError",
    "Message",
    "ProtocolError",
    "PublishId",
    "Subscription",
    "SubscriptionStatistics",
]
