"""One run directory for every rank: the time stamp in it is decided on global rank 0 and shared.

Under an external launcher (torchrun, srun) every process composes the Hydra config itself, so
`${now:...}` would give each rank its own directory. `${run_stamp:FORMAT}` instead asks rank 0 for its
clock through the launcher's rendezvous store (the store torch.distributed will use next), before Hydra
writes anything. Without an external launcher (one process, or Lightning starting the other ranks with
the parent's `hydra.run.dir`) it is simply the local time. Never imports Megatron.
"""

from __future__ import annotations

import datetime
import os
import time

DEFAULT_FORMAT = "%Y-%m-%d_%H-%M-%S"
_KEY = "moe_hf_bridge/run_stamp"
_STORE_TIMEOUT = datetime.timedelta(minutes=10)

_stamp: float | None = None
_store = None  # rank 0 keeps the rendezvous server alive until torch.distributed takes it over


def launcher_rank() -> tuple[int, int] | None:
    """(global rank, world size) when an external launcher started this process, else None."""
    # The same detection Lightning uses to pick its cluster environment.
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    for env_class in (TorchElasticEnvironment, SLURMEnvironment):
        if env_class.detect():
            env = env_class()
            return env.global_rank(), env.world_size()
    return None


def run_stamp(fmt: str = DEFAULT_FORMAT) -> str:
    """The run's start time, formatted; the same on every rank of one launch."""
    global _stamp
    if _stamp is None:
        _stamp = _agreed_time()
    return time.strftime(fmt, time.localtime(_stamp))


def _agreed_time() -> float:
    now = time.time()
    place = launcher_rank()
    if place is None or place[1] == 1:
        return now
    rank, world_size = place
    store = _rendezvous_store(rank, world_size)
    if rank == 0:
        store.set(_KEY, repr(now))
    store.wait([_KEY])
    return float(store.get(_KEY).decode())


def _rendezvous_store(rank: int, world_size: int):
    """A client of the store torch.distributed will rendezvous on (torchrun's agent store), or, under
    srun, that store itself: rank 0 starts it as a multi-tenant server, which `init_process_group`
    (env://, multi-tenant too) then reuses in the same process."""
    global _store
    from torch.distributed import TCPStore

    addr, port = _main_address_port()
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    _store = TCPStore(addr, port, world_size, is_master=rank == 0 and not agent_store, timeout=_STORE_TIMEOUT,
                      wait_for_workers=False, multi_tenant=True)
    return _store


def _main_address_port() -> tuple[str, int]:
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    # The address and port Lightning will give torch.distributed.
    env = TorchElasticEnvironment() if TorchElasticEnvironment.detect() else SLURMEnvironment()
    return env.main_address, env.main_port


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for a non-zero rank of an external launcher: the composed config and the job log
    are rank 0's to write (as Lightning does for the ranks it starts itself)."""
    place = launcher_rank()
    if place is None or place[0] == 0:
        return []
    given = {arg.split("=", 1)[0].lstrip("+~") for arg in argv}
    out = []
    if "hydra.output_subdir" not in given:
        out.append("hydra.output_subdir=null")
    if "hydra.job.name" not in given:
        out.append(f"hydra.job.name=train_rank_{place[0]}")
    return out
