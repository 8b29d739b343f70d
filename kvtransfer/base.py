"""Transport ABC: how a prefill worker pushes a payload to the decode worker named in a ticket."""

from __future__ import annotations

from abc import ABC, abstractmethod

from kvtransfer.layout import KVHeader, KVPayload
from kvtransfer.ticket import Ticket


class KVSender(ABC):
    """Sender side of one transport. `send` raises KVTransferError on any failure or timeout."""

    name: str

    @abstractmethod
    async def send(self, ticket: Ticket, header: KVHeader, payload: KVPayload, timeout: float) -> None:
        ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        pass
