"""The HTTP participants of a fault scenario, in a process of their own.

Run as `python participants_main.py SPEC_JSON`: starts the fake inventory,
payments and shipping services (`sagas.order_fulfilment.simulation.fake_services`)
and the warehouse, which publishes each booked order's planned dispatch over
the scenario's RabbitMQ. The process outlives every worker the test kills, so
its ledger is the book of what really happened at the participants.

A control server answers `GET /ledger` (every effect per operation and order,
and the duplicates), `POST /fault` (`{"participant", "for_s", "status"}`: that
participant answers `status` to every call for `for_s` seconds) and
`POST /heal`. The ports it listens on are written to the spec's `ready` file
once it serves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
from aiohttp import web

from sagas.order_fulfilment.simulation.fake_services import FakeServices
from sagas.order_fulfilment.simulation.order_mix import plan_orders
from sagas.order_fulfilment.simulation.shop import Warehouse
from sagaworks import Message
from sagaworks.adapters.rabbitmq.topology import exchange_name


class PatientWarehouse(Warehouse):
    """The warehouse, retrying a dispatch the broker did not take (it may be restarting)."""

    async def _later(self, delay: float, message: Message, message_id: str) -> None:
        for _ in range(600):
            try:
                await super()._later(delay, message, message_id)
            except Exception:
                delay = 0.5
            else:
                return


async def main(spec: dict[str, Any]) -> None:
    plans = {
        p.order_id: [(s.delay_s, s.message, s.message_id) for s in p.warehouse]
        for p in plan_orders(spec["orders"], spec["run_id"], datetime.now(UTC), seed=spec["seed"])
    }
    connection = await aio_pika.connect_robust(spec["amqp_url"], reconnect_interval=0.5)
    channel = await connection.channel(publisher_confirms=True)
    prefix = spec["prefix"]
    warehouse = PatientWarehouse(
        channel,
        lambda domain: exchange_name(prefix, domain),
        lambda order_id, _shipment: list(plans.get(order_id, ())),
        spec["user"],
    )
    services = FakeServices(on_booked=warehouse.on_booked)
    await services.start()
    by_name = {p.name: p for p in services.participants}

    async def ledger(_: web.Request) -> web.Response:
        effects = [
            {"participant": p.name, "operation": op, "order_id": order, "count": n}
            for p in services.participants
            for (op, order), n in p.effects.items()
        ]
        return web.json_response(
            {
                "effects": effects,
                "duplicates": services.duplicate_effects(),
                "calls": sum(len(p.calls) for p in services.participants),
                "dispatches_published": warehouse.published,
            }
        )

    async def fault(request: web.Request) -> web.Response:
        body = await request.json()
        by_name[body["participant"]].unavailable_for(body["for_s"], status=body.get("status", 503))
        return web.json_response({"ok": True})

    async def heal(_: web.Request) -> web.Response:
        for participant in services.participants:
            participant.heal()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/ledger", ledger)
    app.router.add_post("/fault", fault)
    app.router.add_post("/heal", heal)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    control = int(runner.addresses[0][1])
    ready = {"control": control, **{p.name: p.port for p in services.participants}}
    await asyncio.to_thread(Path(spec["ready"]).write_text, json.dumps(ready))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await warehouse.stop()
    await runner.cleanup()
    await services.stop()
    await connection.close()


if __name__ == "__main__":
    asyncio.run(main(json.loads(sys.argv[1])))
