"""A Redis across a network, on one machine: a TCP proxy that holds every chunk `delay_ms` in each direction.

`python bench/redis_delay.py LISTEN_PORT TARGET_PORT DELAY_MS` serves the proxy (asyncio, one process of its
own); `DelayedRedis(target_port, delay_ms).start()` runs it and gives its `url`. W5 (`bench/service.py
--redis-delay-ms`) puts every process of its queue rows -- workers, API, clients -- behind it, to measure what
the round trips cost where Redis is not on the workers' host (the proxy's own CPU shares the machine: compare
ratios, not rates, with a run without it).
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path

from pagedq.shared.redis_server import free_port

CHUNK = 1 << 16


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float) -> None:
    try:
        while data := await reader.read(CHUNK):
            await asyncio.sleep(delay_s)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(listen_port: int, target_port: int, delay_s: float) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer, delay_s), _pipe(server_reader, client_writer, delay_s))

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()


class DelayedRedis:
    """The proxy in a process of its own, in front of the Redis on `target_port`."""

    def __init__(self, target_port: int, delay_ms: float) -> None:
        self.target_port, self.delay_ms = target_port, delay_ms
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> DelayedRedis:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(self.port),
                                      str(self.target_port), str(self.delay_ms)], start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the Redis delay proxy did not start on port {self.port}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


if __name__ == "__main__":
    listen, target, delay_ms = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen, target, delay_ms / 1000))
