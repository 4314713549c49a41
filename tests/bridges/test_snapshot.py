"""Lazy snapshot (bridges/export/snapshot.py) on the CPU: the host copies hold the values of the moment the
snapshot was taken however late they are made, parameter writes wait for them, buffers are reused."""

import threading

import torch

from bridges.export import snapshot as snapshots
from bridges.export.snapshot import HostBuffers, LazySnapshot, wait_for_snapshots


def _params():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(64, 32, generator=gen), torch.randn(7, generator=gen).bfloat16(), torch.randn((), generator=gen)]


def test_parameter_writes_wait_for_a_copy_no_thread_has_made():
    params, buffers = _params(), HostBuffers()
    before = [p.clone() for p in params]
    snap = LazySnapshot(params, buffers)
    assert snap in snapshots._pending
    wait_for_snapshots()  # as the optimizer step does: makes the copy itself
    assert snap not in snapshots._pending
    for p in params:
        p.add_(1.0)
    hosts = snap.copy()  # the writer thread, later: the copy is not made again
    assert all(torch.equal(h, b) and h.dtype == b.dtype for h, b in zip(hosts, before))
    assert all(h.data_ptr() != p.data_ptr() for h, p in zip(hosts, params))


def test_a_write_waits_for_the_copy_in_progress_in_another_thread():
    params, buffers = _params(), HostBuffers()
    before = [p.clone() for p in params]
    snap = LazySnapshot(params, buffers)
    started, go = threading.Event(), threading.Event()

    class SlowCopy(threading.Thread):
        def run(self):
            with snap._lock:  # the copy is under way: holds the snapshot's lock until told to go on
                started.set()
                go.wait()
            snap.copy()

    writer = SlowCopy()
    writer.start()
    started.wait()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (wait_for_snapshots(), done.set()))
    waiter.start()
    assert not done.wait(0.2)  # the "optimizer step" is held back while the copy runs
    go.set()
    waiter.join()
    writer.join()
    for p in params:
        p.mul_(0)
    assert all(torch.equal(h, b) for h, b in zip(snap.copy(), before))


def test_buffers_are_reused_by_the_next_snapshot_of_the_same_tensors():
    params, buffers = _params(), HostBuffers()
    first = LazySnapshot(params, buffers)
    pointers = [h.data_ptr() for h in first.copy()]
    first.release()
    second = LazySnapshot(params, buffers)
    assert [h.data_ptr() for h in second.hosts] == pointers
    second.release()
    assert not snapshots._pending
