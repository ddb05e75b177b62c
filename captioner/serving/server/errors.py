"""What ends a request of `captioner serve` before it runs or while it waits, below every module
of the server (the data plane, the batcher, the runtime and the fronts all raise or catch these):
an unknown model, a server that is stopping, and a client that has gone (`Deadline`)."""
from __future__ import annotations

import time
from concurrent import futures


class NotFound(Exception):
    """No loaded model (or version) of that name; the message is Triton's."""


class ShuttingDown(Exception):
    """The server is stopping; the request was not run."""


class Expired(Exception):
    """The client has gone (deadline passed or cancelled); its remaining work is dropped."""


class Deadline:
    """When a request's client stops waiting: its gRPC deadline (monotonic seconds, None = none)
    and, given the RPC context, its cancellation. The HTTP front passes a context whose
    is_active() turns false when the client disconnects."""

    def __init__(self, at: float | None = None, context=None):
        self.at, self.context = at, context

    @classmethod
    def of(cls, context) -> "Deadline":
        rem = context.time_remaining()
        # grpc reports a huge remainder for calls without a deadline
        return cls(None if rem is None or rem > 1e8 else time.monotonic() + rem, context)

    def expired(self) -> str | None:
        """Why the client is gone, or None while it waits."""
        if self.at is not None and time.monotonic() >= self.at:
            return "deadline exceeded"
        if self.context is not None and not self.context.is_active():
            return "cancelled"
        return None

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def wait(self, f: futures.Future):
        """The future's result, or Expired once the client has stopped waiting."""
        try:
            return f.result(timeout=self.remaining())
        except futures.TimeoutError:
            raise Expired("deadline exceeded") from None
