"""One launcher for multi-process tests: N gloo processes on this machine, results back per rank.

`run_distributed(world_size, fn, *args)` spawns fresh processes, initialises torch.distributed
(gloo) in each, calls `fn(*args)` and returns the list of per-rank return values. A failure on any
rank is raised here with that rank's traceback; a hung rank is killed after `timeout` seconds.
`fn` must be importable (a module-level function) and its return value picklable.
"""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import sys
import tempfile
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, rendezvous, fn, args, queue):
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    try:
        # A file rendezvous: no TCP port that another process could take between choice and use.
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size)
        # Plain pickle copies tensors by value: torch's queue would pass them as file descriptors,
        # which vanish if this process exits before the parent reads them.
        queue.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:  # report everything, including assertion failures
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if "megatron.core" in sys.modules:  # importing it only to tear down costs seconds
            from bridges.megatron import parallel

            parallel.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(world_size: int, fn, *args, timeout: float = 600.0):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()  # only for code that reads MASTER_PORT (Lightning); the group uses the file
    rendezvous_dir = tempfile.mkdtemp(prefix="launcher-")
    rendezvous = os.path.join(rendezvous_dir, "rendezvous")
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, rendezvous, fn, args, queue), daemon=True)
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    failures: dict[int, str] = {}
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(failures) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, ok, value = queue.get()
        if ok:
            results[rank] = pickle.loads(value)
        else:
            failures[rank] = value
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    shutil.rmtree(rendezvous_dir, ignore_errors=True)
    if failures:
        rank = min(failures)
        raise AssertionError(f"rank {rank} of {world_size} failed:\n{failures[rank]}")
    missing = [r for r in range(world_size) if r not in results]
    if missing:
        raise AssertionError(f"ranks {missing} of {world_size} did not finish within {timeout}s (hang or crash)")
    return [results[r] for r in range(world_size)]
