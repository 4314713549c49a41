"""Export and import of a GLM-4.5-family MoE model (about 1.5 GB of fp32 weights) against the physical limits,
measured side by side in the same processes: `safetensors.torch.save_file` of the same HF tensors from one
process (export) and `load_file` with every byte touched (import), at world 1 and 2.

    python benchmarks/export_import_bench.py [--repeats 5] [--cases ep1,ep2,tp2] [--out docs/benchmarks.json]

Per case (a parallel layout on 1 or 2 gloo processes on this machine), every rank:
- export: our synchronous export as the callback makes it after its first export (`write_checkpoint` of
  `pieces_of(owned_params, copy=False)` with the specs announced, so pieces are made one at a time, and the
  plan kept in a `PlanCache`) against `save_file` of the whole HF state dict from rank 0;
- the HF export callback, synchronous and asynchronous, each followed by the next training step (forward and
  backward of this model on 1 x 128 tokens, then an in-place update behind `wait_for_snapshots()`, where the
  optimizer step waits): how long training waits per export (`export()` blocked + that wait), and how long
  the export takes;
- training time per step with an async export every 3 steps against none, and with the writer thread's CPU
  time taken out (on this 2-core machine the background write competes with training for cores);
- memory: peak resident bytes above the rank's level before the export, for each of the three exports;
- import: `import_weights` from our export's files against `load_file` + touching every tensor from rank 0,
  with the bytes each rank reads and its peak resident memory above the level before the import.
Files are written to the page cache (no fsync, also in the callback, through a patch of its writer): the
disk of this machine (~90 MB/s) would otherwise make every contender take the same time. At world 1 the
callback also runs as it ships (fsync), `--durable-runs` times.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "benchmarks")]

from io_bench import touch  # noqa: E402
from tests.launcher import run_distributed  # noqa: E402

# A GLM-4.5-shaped model: 1 dense + 3 MoE layers of 32 routed experts (+1 shared), MTP 1, ~366M parameters.
BENCH_CONFIG = {
    "model_type": "glm4_moe",
    "architectures": ["Glm4MoeForCausalLM"],
    "vocab_size": 32000,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "attention_bias": True,
    "use_qk_norm": False,
    "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "routed_scaling_factor": 1.0,
    "n_group": 1,
    "topk_group": 1,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}

CASES = {  # name -> (world size, layout kwargs)
    "ep1": (1, {}),
    "ep2": (2, {"ep": 2}),
    "tp2": (2, {"tp": 2}),
}


def measure(case: str, layout_kwargs: dict, scratch: str, repeats: int, durable_runs: int = 0) -> dict:
    """Run on every rank of the case's world; returns this rank's figures."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file

    import callbacks.hf_export as hf_export_module
    from bridges.export.specs import export_specs, hf_tensor_specs, owned_params, pieces_of
    from bridges.export.writer import PlanCache, write_checkpoint
    from bridges.load import import_weights
    from bridges.rules.local_params import local_params
    from bridges.megatron import build, parallel
    from bridges.megatron.layout import ParallelLayout
    from bridges.models.glm45 import FAMILY as glm45
    from bridges.checkpoint.piece_bytes import piece_nbytes
    from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
    from callbacks.hf_export import HFExportCallback
    from memory import PeakRSS

    rank, world = dist.get_rank(), dist.get_world_size()
    layout = ParallelLayout(**layout_kwargs)
    arch = glm45.architecture(BENCH_CONFIG)
    parallel.initialize(layout)
    model = build.build_gpt_model(arch, layout)
    group = dist.new_group(backend="gloo")  # export collectives on a group of their own, as the callback does
    specs = hf_tensor_specs(glm45, arch, torch.float32)
    mine = export_specs([model], glm45, arch)
    held = {t.data_ptr(): t.numel() * t.element_size() for t in (p.tensor for p in local_params([model]))}
    figures = {
        "rank": rank, "world": world, "hf_bytes": sum(_nbytes(s) for s in specs.values()),
        "largest_tensor": max(_nbytes(s) for s in specs.values()), "tensors": len(specs),
        "own_param_bytes": sum(held.values()), "written_bytes": sum(piece_nbytes(s) for s in mine),
        "largest_local_param": max(held.values()),
    }
    # The single writer's input: the same HF tensors (names, shapes, dtype), whole, in one process.
    gen = torch.Generator().manual_seed(0)
    reference = {n: torch.randn(shape, generator=gen) for n, (shape, _) in specs.items()} if rank == 0 else None

    cpu_seconds: dict[str, list[float]] = {}

    def timed(fn, label: str) -> float:
        """Seconds from a common start until the last rank is done; this rank's CPU time (user + system,
        all threads) goes to cpu_seconds[label]: the work itself, whatever else the machine runs."""
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        cpu = time.process_time() - cpu
        dist.barrier()
        cpu_seconds.setdefault(label, []).append(cpu)
        return time.perf_counter() - start

    def on_rank0(fn):
        return lambda: fn() if rank == 0 else None

    def remove(path):
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    ours_dir, ref_dir = os.path.join(scratch, f"{case}_ours"), os.path.join(scratch, f"{case}_save_file")

    owned, plan_cache = owned_params([model], glm45, arch), PlanCache()

    def our_export(out=ours_dir):  # as the callback's sync mode after its first export: plan and pieces kept
        write_checkpoint(pieces_of(owned, copy=False), specs, out, group=group, fsync=False,
                         piece_specs=[spec for o in owned for _, spec in o.pieces], plan_cache=plan_cache)

    def single_writer():
        os.makedirs(ref_dir, exist_ok=True)
        save_file(reference, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})

    # ---- export: ours against save_file, taking turns (the order swaps every round)
    export = {"ours": [], "save_file": []}
    for fn, out in ((our_export, ours_dir), (on_rank0(single_writer), ref_dir)):  # warm-up, not timed
        fn()
        remove(out)
    for r in range(repeats):
        contenders = [("ours", our_export, ours_dir), ("save_file", on_rank0(single_writer), ref_dir)]
        for label, fn, out in contenders[:: 1 if r % 2 == 0 else -1]:
            export[label].append(timed(fn, f"export {label}"))
            remove(out)
    figures["export"] = export

    # ---- the callback, sync and async, each followed by the next training step: how long training waits
    hf_export_module.write_checkpoint = functools.partial(write_checkpoint, fsync=False)  # page cache, see above
    trainer = SimpleNamespace(global_step=0, global_rank=rank, world_size=world, loggers=[], datamodule=None,
                              default_root_dir=os.path.join(scratch, case), strategy=SimpleNamespace(layout=layout))
    module = SimpleNamespace(hf_source=None, params_dtype=torch.float32, arch=arch, family=glm45, model=model,
                             mtp_enabled=True, gather_updated_params=lambda: None)
    callback = HFExportCallback(dirpath=os.path.join(scratch, f"{case}_callback"), save_last=False)
    callback.on_fit_start(trainer, module)
    write_cpu: list[float] = []  # CPU seconds of each export's write (the writer thread's, async)
    real_write = callback._write

    def counted_write(job, global_rank):
        cpu = time.thread_time()
        real_write(job, global_rank)
        write_cpu.append(time.thread_time() - cpu)

    callback._write = counted_write
    step = _TrainStep(model, arch.vocab_size)
    step.run()  # warm-up

    def callback_export(async_write: bool, next_step: bool = True) -> dict:
        """One export, then the next step; stall = export() blocked + the optimizer step's wait."""
        callback.async_write = async_write
        trainer.global_step += 1
        dist.barrier()
        start = time.perf_counter()
        callback.export(trainer, module)
        blocked = time.perf_counter() - start
        compute, fence = step.run() if next_step else (0.0, 0.0)
        callback.on_train_end(trainer, module)  # waits for the write (save_last=False: nothing new)
        seconds = callback.history[-1]["seconds"]
        dist.barrier()
        if rank == 0:
            shutil.rmtree(callback.history[-1]["path"])
        return {"blocked": blocked, "fence": fence, "stall": blocked + fence, "compute": compute,
                "seconds": seconds, "write_cpu": write_cpu[-1]}

    def callback_runs(n: int) -> dict:
        runs = {"sync": [], "async": []}
        for r in range(n):
            for async_write in ((False, True) if r % 2 == 0 else (True, False)):
                runs["async" if async_write else "sync"].append(callback_export(async_write))
        return runs

    callback_export(True)  # the first export makes the plan and the snapshot buffers; later ones reuse them
    figures["callback"] = callback_runs(repeats)
    if durable_runs:  # the callback as it ships: fsync before publishing, so the disk sets the pace
        hf_export_module.write_checkpoint = write_checkpoint
        figures["callback_durable"] = callback_runs(durable_runs)
        hf_export_module.write_checkpoint = functools.partial(write_checkpoint, fsync=False)

    # ---- training time per step with an async export every EVERY steps against none, taking turns
    def train(steps: int, every: int) -> dict:
        del write_cpu[:]
        dist.barrier()
        start = time.perf_counter()
        for i in range(steps):
            if every and i % every == 0:
                trainer.global_step += 1
                callback.export(trainer, module)
            step.run()
        callback.on_train_end(trainer, module)
        per_step = (time.perf_counter() - start) / steps
        dist.barrier()
        if rank == 0:
            for entry in callback.history[-len(write_cpu):] if write_cpu else []:
                shutil.rmtree(entry["path"], ignore_errors=True)
        return {"per_step": per_step, "write_cpu_per_step": sum(write_cpu) / steps}

    callback.async_write = True
    training = {"every": TRAIN_EVERY, "steps": TRAIN_STEPS, "with_export": [], "without": []}
    for r in range(max(2, repeats // 2)):
        for every in ((TRAIN_EVERY, 0) if r % 2 == 0 else (0, TRAIN_EVERY)):
            training["with_export" if every else "without"].append(train(TRAIN_STEPS, every))
    figures["training"] = training
    figures["step"] = {"batch": step.batch, "seq": step.seq}
    callback.on_fit_end(trainer, module)  # releases the export root's lock

    # ---- import: ours (every rank, its own regions) against load_file + touch on rank 0
    our_export()
    imported = {"ours": [], "load_file": [], "bytes_read": 0}

    def our_import():
        with SafetensorsCheckpoint(ours_dir) as source:
            import_weights([model], glm45, arch, source)
            imported["bytes_read"] = source.bytes_read

    def load_and_touch():
        touch(load_file(os.path.join(ours_dir, "model.safetensors")).values())

    for r in range(repeats):
        contenders = [("ours", our_import), ("load_file", on_rank0(load_and_touch))]
        for label, fn in contenders[:: 1 if r % 2 == 0 else -1]:
            imported[label].append(timed(fn, f"import {label}"))
    dist.barrier()
    with PeakRSS() as peak:  # the files' pages mapped while read count too: they are resident in this process
        our_import()
    imported["peak_extra"] = peak.extra
    figures["import"] = imported

    # ---- memory: peak above the level before (free heap pages returned first, so reuse counts)
    del reference
    memory = {}
    for label, fn in (("library sync", our_export), ("callback sync", lambda: callback_export(False, False)),
                      ("callback async", lambda: callback_export(True, False))):
        dist.barrier()
        with PeakRSS() as peak:
            fn()
        memory[label] = peak.extra
        remove(ours_dir)
    figures["memory"] = memory
    figures["cpu_seconds"] = cpu_seconds
    remove(os.path.join(scratch, f"{case}_callback"))
    return figures


def _nbytes(spec) -> int:
    shape, dtype = spec
    return math.prod(shape) * dtype.itemsize


TRAIN_STEPS, TRAIN_EVERY = 6, 3  # the training-time comparison: steps per run, an export every this many


class _TrainStep:
    """A training step of the bench model itself, as an export overlaps it: forward and backward on `batch`
    sequences of `seq` tokens, then every weight updated in place (plain SGD) once `wait_for_snapshots()`
    returns, where Megatron's optimizer step waits too. Returns (forward + backward seconds, wait seconds)."""

    def __init__(self, model, vocab_size: int, batch: int = 1, seq: int = 128):
        import torch

        from bridges.megatron.build import causal_attention_mask

        self.model, self.batch, self.seq = model, batch, seq
        tokens = torch.randint(0, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
        self.inputs, self.labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        self.position_ids = torch.arange(seq).expand(batch, seq)
        self.mask = causal_attention_mask(seq)

    def run(self) -> tuple[float, float]:
        import torch

        from bridges.export.snapshot import wait_for_snapshots

        start = time.perf_counter()
        loss = self.model(self.inputs, self.position_ids, self.mask, labels=self.labels)
        loss.float().mean().backward()
        compute = time.perf_counter() - start
        start = time.perf_counter()
        wait_for_snapshots()
        fence = time.perf_counter() - start
        with torch.no_grad():
            for p in self.model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-6)
                    p.grad = None
        return compute, fence


def summarise(case: str, ranks: list[dict]) -> dict:
    """Medians over runs (timings are taken from rank 0: every timing ends when the last rank is done)."""
    med = statistics.median
    r0 = ranks[0]
    return {
        "case": case, "world": r0["world"], "hf_bytes": r0["hf_bytes"], "largest_tensor": r0["largest_tensor"],
        "tensors": r0["tensors"], "repeats": len(r0["export"]["ours"]),
        "export_ours": med(r0["export"]["ours"]), "export_save_file": med(r0["export"]["save_file"]),
        # CPU seconds: ours on the busiest rank, the reference on rank 0 (which ran it)
        "export_ours_cpu": _busiest_cpu(ranks, "export ours"), "export_save_file_cpu": _rank0_cpu(r0, "export save_file"),
        "import_ours_cpu": _busiest_cpu(ranks, "import ours"), "import_load_file_cpu": _rank0_cpu(r0, "import load_file"),
        **_stalls(ranks, "callback"),
        "durable": {"runs": len(r0["callback_durable"]["sync"]), **_stalls([r0], "callback_durable")}
        if r0.get("callback_durable") else None,
        "import_ours": med(r0["import"]["ours"]), "import_load_file": med(r0["import"]["load_file"]),
        "step": r0["step"], "training": _training(ranks),
        "per_rank": [
            {"own_param_bytes": r["own_param_bytes"], "written_bytes": r["written_bytes"],
             "bytes_read": r["import"]["bytes_read"], "memory": r["memory"],
             "import_peak_extra": r["import"]["peak_extra"], "largest_local_param": r["largest_local_param"]}
            for r in ranks
        ],
        "runs": {  # every run, in seconds (rank 0)
            "export": r0["export"], "import": {k: r0["import"][k] for k in ("ours", "load_file")},
            "callback": {mode: [x["stall"] for x in runs] for mode, runs in r0["callback"].items()},
        },
    }


def _stalls(ranks: list[dict], key: str) -> dict:
    """Medians over runs of the slowest rank: how long training waited per export, sync and async."""
    def slowest(mode: str, what: str) -> float:
        runs = len(ranks[0][key][mode])
        return statistics.median(max(r[key][mode][i][what] for r in ranks) for i in range(runs))

    return {
        "sync_blocked": slowest("sync", "blocked"), "async_blocked": slowest("async", "blocked"),
        "async_fence": slowest("async", "fence"), "async_stall": slowest("async", "stall"),
        "async_seconds": slowest("async", "seconds"), "step_compute": slowest("sync", "compute"),
        "step_compute_beside_copy": slowest("async", "compute"), "async_write_cpu": slowest("async", "write_cpu"),
    }


def _training(ranks: list[dict]) -> dict:
    """Seconds per training step with an async export every N steps and without (slowest rank, medians), and
    with the write's CPU seconds (the writer thread's, per step) taken out of the former."""
    t = ranks[0]["training"]

    def slowest(kind: str, what: str) -> float:
        return statistics.median(max(r["training"][kind][i][what] for r in ranks) for i in range(len(t[kind])))

    with_export = slowest("with_export", "per_step")
    write_cpu = slowest("with_export", "write_cpu_per_step")
    return {"every": t["every"], "steps": t["steps"], "with_export": with_export,
            "without": slowest("without", "per_step"), "write_cpu_per_step": write_cpu,
            "with_export_minus_write_cpu": with_export - write_cpu}


def _busiest_cpu(ranks: list[dict], label: str) -> float:
    runs = zip(*(r["cpu_seconds"][label] for r in ranks))
    return statistics.median(max(run) for run in runs)


def _rank0_cpu(r0: dict, label: str) -> float:
    return statistics.median(r0["cpu_seconds"][label])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.json"))
    parser.add_argument("--durable-runs", type=int, default=1,
                        help="callback exports with fsync (as it ships) at world 1, each ~1.5 GB at the disk's pace")
    parser.add_argument("--scratch", default=None, help="directory for the exports (default: a temporary one)")
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="export_import_bench_", dir=args.scratch)
    results = []
    try:
        for case in args.cases.split(","):
            world, layout = CASES[case]
            start = time.perf_counter()
            durable = args.durable_runs if world == 1 else 0
            ranks = run_distributed(world, measure, case, layout, scratch, args.repeats, durable, timeout=1200)
            results.append(summarise(case, ranks))
            print(f"{case}: measured in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": BENCH_CONFIG, "load_average": os.getloadavg(), "cases": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
