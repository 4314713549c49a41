"""One run directory for every rank under an external launcher (torchrun, srun)."""

import datetime
import os
import subprocess
import sys
import time

import torch.multiprocessing as mp

from tests.launcher import free_port
from tests.train_runs import ROOT


def _slurm_rank(rank, port, queue):
    """A rank as srun starts it: it learns the run stamp from rank 0, then torch.distributed starts on
    the same address and port (rank 0's rendezvous server is reused)."""
    os.environ.update(SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NODEID="0",
                      SLURM_JOB_NAME="train", SLURM_JOB_ID="42", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        os.environ.pop(name, None)
    try:
        import torch
        import torch.distributed as dist

        from recipes import run_dir

        if rank == 1:
            time.sleep(1.5)  # its own clock would name another directory
        stamp = run_dir.run_stamp("%H-%M-%S")
        overrides = run_dir.rank_overrides([])
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        dist.destroy_process_group()
        queue.put((rank, (stamp, run_dir._stamp, overrides, int(total))))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put((rank, repr(e)))


def test_ranks_agree_on_rank_zeros_stamp_and_torch_distributed_starts_after():
    ctx = mp.get_context("spawn")
    queue, port = ctx.SimpleQueue(), free_port()
    procs = [ctx.Process(target=_slurm_rank, args=(r, port, queue), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert all(isinstance(results[r], tuple) for r in range(2)), results
    (stamp0, t0, over0, sum0), (stamp1, t1, over1, sum1) = results[0], results[1]
    assert t0 == t1 and stamp0 == stamp1
    assert sum0 == sum1 == 3  # init_process_group after the agreement works on both ranks
    assert over0 == [] and over1 == ["hydra.output_subdir=null", "hydra.job.name=train_rank_1"]


def test_torchrun_without_run_dir_gives_one_directory_with_the_export(tmp_path):
    """`torchrun --nproc-per-node 2 train.py` (no hydra.run.dir, devices=auto): one run directory. (`--standalone`:
    a free rendezvous port, not 29500, which another run on this machine may hold.)"""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "train.py"), "recipe=glm45", "trainer.max_steps=2",
           "trainer.devices=auto", "~callbacks.progress"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = os.listdir(tmp_path / "outputs" / "glm45")
    assert len(runs) == 1, runs
    run = tmp_path / "outputs" / "glm45" / runs[0]
    assert (run / "hf" / "step_2" / "config.json").is_file()
    assert (run / "hf" / "latest").read_text().strip() == "step_2"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "metrics.json").is_file()


def test_slurm_launcher_config_composes_one_task_per_gpu():
    """conf/hydra/launcher/slurm.yaml with hydra-submitit-launcher (the `slurm` extra) installed."""
    import pytest

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    import train  # noqa: F401 (our resolvers)

    with initialize_config_dir(config_dir=f"{ROOT}/conf", version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True,
                      overrides=["recipe=glm45", "hydra/launcher=slurm", "trainer.devices=8", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)
