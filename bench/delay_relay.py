"""A TCP relay that adds a fixed one-way delay to each direction without limiting throughput.

This kernel has no netem, so bench/coldstart puts this relay in the registry's network namespace,
in front of the registry: client ↔ relay ↔ registry. Each block read from one side is stamped with
its arrival time and written to the other side at arrival + delay, while reading goes on; so a
round trip through it takes 2 × delay more and a bulk transfer keeps its rate (bounded queues:
a slow receiver stops the reads, as TCP would).

    python bench/delay_relay.py --listen 10.78.0.1:5000 --target 127.0.0.1:5000 --delay-ms 2.5
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import suppress

BLOCK = 256 * 1024
QUEUE_BLOCKS = 256  # per direction: at most 64 MiB in flight, far more than rate × delay


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    """Forward reader → writer, each block at its arrival time + delay_s; EOF after the last."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_BLOCKS)

    async def receive() -> None:
        try:
            while block := await reader.read(BLOCK):
                await queue.put((time.monotonic() + delay_s, block))
        except OSError:
            pass
        await queue.put((time.monotonic() + delay_s, b""))

    receiver = asyncio.create_task(receive())
    try:
        while True:
            due, block = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            if not block:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(block)
            await writer.drain()
    except OSError:
        return
    finally:
        receiver.cancel()
        with suppress(asyncio.CancelledError):
            await receiver


class DelayRelay:
    """`async with DelayRelay(listen_host, listen_port, target_host, target_port, delay_s)`."""

    def __init__(self, host: str, port: int, target_host: str, target_port: int, delay_s: float) -> None:
        self.host, self.port = host, port
        self.target = (target_host, target_port)
        self.delay_s = delay_s
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            try:
                u_reader, u_writer = await asyncio.open_connection(*self.target)
            except OSError:
                c_writer.close()
                return
            try:
                await asyncio.gather(_pump(c_reader, u_writer, self.delay_s), _pump(u_reader, c_writer, self.delay_s))
            except asyncio.CancelledError:
                pass  # close(): end quietly (asyncio's stream callback would report a cancelled handler)
            finally:
                for w in (u_writer, c_writer):
                    w.close()
                    with suppress(OSError):
                        await w.wait_closed()
        finally:
            self._conns.discard(task)

    async def start(self) -> DelayRelay:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> DelayRelay:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    host, port = _split(args.listen)
    target_host, target_port = _split(args.target)
    async with DelayRelay(host, port, target_host, target_port, args.delay_ms / 1000) as relay:
        print(f"relay listening on {relay.host}:{relay.port}", flush=True)  # the parent waits for this line
        await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    parser.add_argument("--target", required=True, help="HOST:PORT to forward to")
    parser.add_argument("--delay-ms", type=float, required=True, help="one-way delay added to each direction")
    args = parser.parse_args()
    with suppress(KeyboardInterrupt):
        asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
