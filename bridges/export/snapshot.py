"""Lazy snapshot: host copies of parameters, made in the background while training computes the next step.

Parameters do not change during the forward and backward passes, so an export records what to copy and
returns; the copy overlaps the next step. CPU tensors are copied by `copy()`, called from a background
thread (torch's copy releases the GIL); CUDA tensors by `non_blocking` copies into pinned host buffers on a
side stream, enqueued at once, with one event. Whatever changes parameters in place (the optimizer step,
the router's expert-bias update, an import, a checkpoint load, the end of training) calls
`wait_for_snapshots()` first. Host buffers come from a pool that the next snapshot of the same tensors
reuses. The device is decided by the tensors. Never imports Lightning.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch

_pending: set["LazySnapshot"] = set()
_pending_lock = threading.Lock()


def wait_for_snapshots() -> None:
    """Return once no snapshot still reads the parameters: CPU copies are done (made here if no thread has
    started them); CUDA copies are ordered before the current stream's next work (the host does not wait)."""
    with _pending_lock:
        pending = list(_pending)
    for snapshot in pending:
        snapshot.protect()


class HostBuffers:
    """Host tensors kept from one snapshot to the next (pinned where they receive CUDA copies), and the side
    stream the CUDA copies run on."""

    def __init__(self):
        self._free: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        self._streams: dict = {}

    def stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def take(self, like: torch.Tensor) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, like.is_cuda)
        if self._free[key]:
            return self._free[key].pop()
        return torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)

    def give_back(self, tensors: list[torch.Tensor], pinned: list[bool]) -> None:
        for t, pin in zip(tensors, pinned):
            self._free[(tuple(t.shape), t.dtype, pin)].append(t)


class LazySnapshot:
    """Host copies of `tensors` as they are now, made later: CUDA copies are enqueued here, CPU copies are
    made by `copy()`. Pending (see `wait_for_snapshots`) until every copy is done."""

    def __init__(self, tensors: list[torch.Tensor], buffers: HostBuffers):
        self._buffers = buffers
        self._sources = [t.detach() for t in tensors]
        self._pinned = [t.is_cuda for t in self._sources]
        self.hosts = [buffers.take(t) for t in self._sources]
        self._lock = threading.Lock()
        self._done = False
        self._event = None
        cuda = [(host, t) for host, t in zip(self.hosts, self._sources) if t.is_cuda]
        if cuda:  # behind everything the compute stream was given so far: the optimizer step included
            device = cuda[0][1].device
            stream = buffers.stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for host, t in cuda:
                    host.copy_(t, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record(stream)
            self._device = device
        with _pending_lock:
            _pending.add(self)

    def copy(self) -> list[torch.Tensor]:
        """The host copies, once made (CPU tensors copied here, CUDA copies waited for); made once."""
        with self._lock:
            if not self._done:
                try:
                    for host, t in zip(self.hosts, self._sources):
                        if not t.is_cuda:
                            host.copy_(t)
                    if self._event is not None:
                        self._event.synchronize()
                finally:
                    self._done, self._sources = True, []
                    with _pending_lock:
                        _pending.discard(self)
        return self.hosts

    def protect(self) -> None:
        """After this, the parameters may change: CUDA copies come first on the current stream; CPU copies
        are finished (here, if no thread has made them yet)."""
        if self._event is not None and all(self._pinned):
            torch.cuda.current_stream(self._device).wait_event(self._event)
            return
        self.copy()

    def release(self) -> None:
        """The host copies are written: their buffers serve the next snapshot."""
        self.copy()
        self._buffers.give_back(self.hosts, self._pinned)
        self.hosts = []
