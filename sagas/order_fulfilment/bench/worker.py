"""One worker process of `sagaworks bench`: the real `Worker`, simulated participants.

It is `sagaworks worker` with two differences the benchmark needs: the
shipping participant tells an in-process warehouse, which dispatches every
booked shipment at once (happy path), and on SIGTERM the process writes its
participants' ledger to a file, so the bench can prove across processes that
no effect was applied twice. Settings come from the environment as for
`sagaworks worker`. Prints `ready` once it consumes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

import aio_pika

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import ShipmentDispatched
from sagas.order_fulfilment.simulation.participants import Ledger, Simulation, simulated_ports
from sagas.order_fulfilment.simulation.shop import Warehouse, simulated_publishers
from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.bootstrap import bootstrap, own_user, preflight
from sagaworks.domain.messages import Message
from sagaworks.entrypoints.gc_tuning import tune_for_throughput
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

__all__ = ["main", "run_bench_worker"]


def _dispatch_at_once(order_id: str, shipment_id: str) -> list[tuple[float, Message, str]]:
    dispatched = ShipmentDispatched(order_id=order_id, shipment_id=shipment_id)
    return [(0.0, dispatched, f"{order_id}/dispatched")]


async def run_bench_worker(settings: Settings, latency_s: float) -> Ledger:
    """Consume until SIGTERM/SIGINT, stop gracefully; return the participants' ledger."""
    await preflight(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    ledger = Ledger()
    prefix = settings.exchange_prefix
    user = own_user(settings)
    settings = simulated_publishers(settings, user)
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    channel = await connection.channel(publisher_confirms=True)
    warehouse = Warehouse(
        channel, lambda domain: exchange_name(prefix, domain), _dispatch_at_once, user
    )
    ports = simulated_ports(Simulation(latency_s=latency_s), ledger, warehouse.on_booked)
    system = await bootstrap(settings, [order_fulfilment], ports)
    worker = Worker(system)
    try:
        await worker.start()
        tune_for_throughput()
        print("ready", flush=True)  # noqa: T201 - the bench waits for this line
        await stop.wait()
    finally:
        await worker.stop()
        await warehouse.stop()
        await system.aclose()
        await connection.close()
    return ledger


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_worker")
    parser.add_argument("--latency-s", type=float, default=0.0)
    parser.add_argument("--ledger", type=Path, required=True)
    args = parser.parse_args(argv)
    settings = Settings.load()
    configure_logging(settings.log_format, "WARNING")
    coroutine = run_bench_worker(settings, args.latency_s)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on some platforms
        ledger = asyncio.run(coroutine)
    else:
        ledger = uvloop.run(coroutine)
    effects = [f"{op}\x1f{order}\x1f{n}" for (op, order), n in ledger.effects.items()]
    args.ledger.write_text(json.dumps({"effects": effects}))


if __name__ == "__main__":
    main()
