"""A TCP relay that delays every byte by a fixed one-way latency in each direction.

bench/e2e.py runs it inside the device's network namespace when the kernel has no netem
qdisc (rate is still shaped in the kernel with tbf). Usage:

    python bench/delay_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT ONE_WAY_MS
"""

from __future__ import annotations

import asyncio
import sys
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    task = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            queue.put_nowait((time.monotonic() + delay, data))
    finally:
        queue.put_nowait((0.0, None))
        await task


async def main(listen: str, target: str, one_way_ms: float) -> None:
    delay = one_way_ms / 1000
    thost, tport = target.rsplit(":", 1)

    async def handle(client_r, client_w):
        server_r, server_w = await asyncio.open_connection(thost, int(tport))
        await asyncio.gather(pump(client_r, server_w, delay), pump(server_r, client_w, delay), return_exceptions=True)

    lhost, lport = listen.rsplit(":", 1)
    server = await asyncio.start_server(handle, lhost, int(lport))
    print("relaying", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
