"""Messages over a stream: the thin trio layer between a session and the codec.

Nouns:

* **channel** — :class:`MessageChannel`: a byte stream (normally a
  :class:`~p2pbackup.wire.session.SecureStream`) plus a
  :class:`~p2pbackup.wire.messages.FrameDecoder`. It sends whole messages and
  receives whole messages; it knows nothing of what they mean.
* **clean end** — the peer closed the stream between two frames;
  :meth:`MessageChannel.receive_or_end` returns None. A close in the middle of
  a frame is a protocol error, since a message was cut short.

Every wait is bounded by the caller (``trio.fail_after`` / ``move_on_after``):
a channel never decides on its own how long a peer may take.
"""

from __future__ import annotations

import trio

from p2pbackup.errors import RemoteProtocolError
from p2pbackup.model import BytesLike
from p2pbackup.wire import messages

#: Bytes asked of the stream at once: a little more than one piece, so that a
#: 1 MiB piece arrives in few reads.
_RECEIVE_SIZE = 256 * 1024


class MessageChannel:
    """Whole messages over one byte stream."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self._decoder = messages.FrameDecoder()

    async def send(self, message: messages.Message) -> None:
        await self.stream.send_all(messages.encode_frame(message))

    async def send_piece(self, data: BytesLike) -> None:
        """Send ``ShardPiece(data)``: on a secure session without copying ``data``
        into a frame first (a shard upload is mostly this)."""
        head = messages.piece_frame_head(len(data))
        send_parts = getattr(self.stream, "send_all_parts", None)
        if send_parts is None:
            await self.stream.send_all(head + bytes(data))
        else:
            await send_parts((head, data))

    async def receive_or_end(self) -> messages.Message | None:
        """The next message, or None if the peer closed the stream cleanly."""
        while True:
            message = self._decoder.next_message()
            if message is not None:
                return message
            data = await self.stream.receive_some(_RECEIVE_SIZE)
            if not data:
                if self._decoder.at_frame_boundary():
                    return None
                raise RemoteProtocolError(
                    "the peer closed the connection in the middle of a message"
                )
            self._decoder.feed(data)

    async def receive(self) -> messages.Message:
        """The next message. The peer closing the stream here (between frames)
        means the connection is gone: :class:`trio.BrokenResourceError`."""
        message = await self.receive_or_end()
        if message is None:
            raise trio.BrokenResourceError("the peer closed the connection before answering")
        return message

    def detach(self) -> trio.abc.Stream:
        """The stream, for bytes that are no longer messages (a relay's
        circuit): whatever arrived behind the last message comes first."""
        rest = self._decoder.take_buffered()
        return self.stream if not rest else _Prefixed(self.stream, rest)

    async def aclose(self) -> None:
        await self.stream.aclose()


class _Prefixed(trio.abc.Stream):
    """A stream that returns ``prefix`` before anything more it receives."""

    def __init__(self, stream: trio.abc.Stream, prefix: bytes) -> None:
        self.transport_stream = stream
        self._prefix = prefix

    async def send_all(self, data: BytesLike) -> None:
        await self.transport_stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._prefix:
            return await self.transport_stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        size = len(self._prefix) if max_bytes is None else max_bytes
        data, self._prefix = self._prefix[:size], self._prefix[size:]
        return data

    async def aclose(self) -> None:
        await self.transport_stream.aclose()
