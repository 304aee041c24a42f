"""Bandwidth limits: a network whose streams move at most so many bytes a second.

Nouns:

* **limits** — :class:`BandwidthLimits`: bytes a second up (what this node
  sends) and down (what it reads), each None for no limit. ``backup``,
  ``restore`` and ``check`` take them as ``--limit-upload`` and
  ``--limit-download`` (KiB/s); ``serve`` from ``config.toml``'s
  ``[bandwidth]`` table, for everything it does at once.
* **paced network** — :class:`PacedNetwork`: another :class:`Network` whose
  every stream, dialled or accepted, books what it sends and reads on the
  network's two shared paces (:class:`~p2pbackup.net.pacing.Pace`), so that
  all its streams together keep to the limits. A send waits before it goes
  out; a read waits after it came in, so the sender's TCP window closes
  and the far end slows down too. Datagrams (the DHT's, a few hundred bytes
  each) are not paced.

Sends are cut into pieces of :data:`PIECE` bytes, and bursts are short
(:data:`BURST`): the rate holds over seconds, not only on average over a
whole backup.
"""

from __future__ import annotations

from typing import Final

import attrs
import trio

from p2pbackup.model import BytesLike
from p2pbackup.net.network import (
    Address,
    DatagramEndpoint,
    Network,
    StreamHandler,
    local_address,
    peer_address,
)
from p2pbackup.net.pacing import Pace

#: Bytes a paced send hands on at once.
PIECE: Final = 16 * 1024
#: Bytes that may go at once after a quiet spell.
BURST: Final = 64 * 1024


@attrs.frozen
class BandwidthLimits:
    """Bytes a second up and down; None: no limit that way."""

    upload: float | None = None
    download: float | None = None

    @classmethod
    def from_kib(cls, upload: float | None, download: float | None) -> BandwidthLimits:
        """From KiB/s, as the command line and ``config.toml`` give them."""
        return cls(
            None if upload is None else upload * 1024,
            None if download is None else download * 1024,
        )

    @property
    def unlimited(self) -> bool:
        return self.upload is None and self.download is None


class PacedNetwork:
    """``inner``, with every stream kept to ``limits`` together (module docstring)."""

    def __init__(self, inner: Network, limits: BandwidthLimits) -> None:
        self.inner = inner
        self.limits = limits
        self.upload = Pace(limits.upload, burst=BURST)
        self.download = Pace(limits.download, burst=BURST)

    def __getattr__(self, name: str) -> object:
        # What a network offers beyond the interface (its default gateway,
        # for the router's port mapping) is the inner network's.
        return getattr(self.inner, name)

    async def connect(self, address: Address, *, local_port: int | None = None) -> trio.abc.Stream:
        return PacedStream(await self.inner.connect(address, local_port=local_port), self)

    async def serve(
        self,
        address: Address,
        handler: StreamHandler,
        *,
        task_status: trio.TaskStatus[Address] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        async def paced(stream: trio.abc.Stream) -> None:
            await handler(PacedStream(stream, self))

        await self.inner.serve(address, paced, task_status=task_status)

    async def open_datagram(self, address: Address) -> DatagramEndpoint:
        return await self.inner.open_datagram(address)


class PacedStream(trio.abc.Stream):
    """A stream whose sends and reads wait their turn on a paced network."""

    def __init__(self, stream: trio.abc.Stream, network: PacedNetwork) -> None:
        self.stream = stream
        self.network = network

    @property
    def remote_address(self) -> Address | None:
        """Who is at the other end (as :func:`peer_address` finds it)."""
        return peer_address(self.stream)

    @property
    def local_address(self) -> Address | None:
        """This end's address (as :func:`local_address` finds it)."""
        return local_address(self.stream)

    async def send_all(self, data: BytesLike) -> None:
        view = memoryview(data)
        if not len(view):
            await self.stream.send_all(data)
            return
        for start in range(0, len(view), PIECE):
            piece = view[start : start + PIECE]
            wait = self.network.upload.book(len(piece), trio.current_time())
            if wait > 0:
                await trio.sleep(wait)
            await self.stream.send_all(piece)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.stream.receive_some(max_bytes)
        wait = self.network.download.book(len(data), trio.current_time())
        if wait > 0:
            await trio.sleep(wait)
        return data

    async def aclose(self) -> None:
        await self.stream.aclose()


def limited(network: Network, limits: BandwidthLimits) -> Network:
    """``network`` kept to ``limits`` (itself when there are none)."""
    if limits.unlimited:
        return network
    return PacedNetwork(network, limits)
