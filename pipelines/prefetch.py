"""Batch k+1's host→device copy and augmentation on a side stream while step k runs.

`prefetch(items, prepare, device)` calls `prepare` one item ahead of its consumer, on every
device the same order. On CUDA, `prepare` runs on a side stream, so its copy and its ~150 small
augmentation kernels per view overlap the step instead of queueing behind it on the compute
stream; a batch is handed over with the consumer's stream waiting on that batch's event only,
and each tensor handed over is record_stream'ed on the consumer's stream, so the caching
allocator cannot give its memory back to the side stream while the step still reads it. The side
stream waits on nothing: its inputs are host memory, its outputs fresh allocations. On a CPU
there are no streams: the same loop runs `prepare` in line.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

Item = TypeVar("Item")
Tensors = TypeVar("Tensors", bound=Sequence[torch.Tensor])


class SideStream:
    """Where `prepare` runs: a CUDA stream of `device`, or (CPU, or not `enabled`) the caller's
    thread on its current stream."""

    def __init__(self, device: torch.device | str, enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device) if enabled and self.device.type == "cuda" else None

    def launch(self, prepare: Callable[[Item], Tensors], item: Item) -> tuple[Tensors, torch.cuda.Event | None]:
        """prepare(item) queued on the side stream, with the event that marks its end."""
        if self.stream is None:
            return prepare(item), None
        with torch.cuda.stream(self.stream):
            out = prepare(item)
            done = torch.cuda.Event()
            done.record()
        return out, done

    def hand_over(self, out: Tensors, done: torch.cuda.Event | None) -> Tensors:
        """`out`, safe to use on the device's current stream."""
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            for t in out:
                t.record_stream(stream)
        return out


def prefetch(items: Iterable[Item], prepare: Callable[[Item], Tensors], device: torch.device | str,
             side_stream: bool = True) -> Iterator[Tensors]:
    """prepare(item) for each of `items`, in order; item k+1 is taken and its prepare launched
    before the result of item k is handed over. Leaving early closes `items` (if it can be).
    side_stream false (data.side_stream): on the current stream, for comparison."""
    side = SideStream(device, side_stream)
    source = iter(items)
    try:
        pending = None
        for item in source:
            launched = side.launch(prepare, item)
            if pending is not None:
                yield side.hand_over(*pending)
            pending = launched
        if pending is not None:
            yield side.hand_over(*pending)
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
