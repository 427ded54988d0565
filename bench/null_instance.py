#!/usr/bin/env python3
"""An instance that does nothing: the floor of haproxy plus two Python processes.

Stands in for rinha.py behind the real haproxy.cfg (bench/floor.py --behind null): it
speaks just enough HTTP/1.1 on the same unix socket (LISTEN=unix:/path) for the contest's
k6 script and haproxy's check, answers every request at once from fixed bytes, and keeps,
journals and forwards nothing. POST -> 202 (200 for a purge), GET /payments-summary ->
zeros, any other GET -> 200. What rinha costs above this is its own work: parsing,
journaling, forwarding, replicating.
"""
import asyncio
import os

import uvloop

ACCEPTED = b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n"
PURGED = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n{"message":"purged"}'
SUMMARY_BODY = (b'{"default":{"totalRequests":0,"totalAmount":0},'
                b'"fallback":{"totalRequests":0,"totalAmount":0}}')
SUMMARY = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
           % (len(SUMMARY_BODY), SUMMARY_BODY))
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class NullConnection(asyncio.Protocol):
    __slots__ = ("transport", "buffer")

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray()

    def data_received(self, data):
        buffer = self.buffer
        buffer += data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            at = buffer.lower().find(b"content-length:", 0, end)
            length = int(buffer[at + 15:buffer.find(b"\r\n", at)]) if at >= 0 else 0
            if len(buffer) < end + 4 + length:
                return
            line = bytes(buffer[:buffer.find(b"\r\n")])
            del buffer[:end + 4 + length]
            if line.startswith(b"POST "):
                self.transport.write(PURGED if b"purge" in line else ACCEPTED)
            elif line.startswith(b"GET /payments-summary"):
                self.transport.write(SUMMARY)
            else:
                self.transport.write(OK)


async def serve():
    path = os.environ["LISTEN"].removeprefix("unix:")
    if os.path.exists(path):
        os.unlink(path)
    server = await asyncio.get_running_loop().create_unix_server(NullConnection, path, backlog=4096)
    os.chmod(path, 0o666)
    print(f"null instance listening on {path}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve())
