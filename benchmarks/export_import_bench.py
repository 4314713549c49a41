"""Export and import of a GLM-4.5-family MoE model (about 1.5 GB of fp32 weights) against the physical limits,
measured side by side in the same processes: `safetensors.torch.save_file` of the same HF tensors from one
process (export) and `load_file` with every byte touched (import), at world 1 and 2.

    python benchmarks/export_import_bench.py [--repeats 5] [--cases ep1,ep2,tp2] [--out docs/benchmarks.json]

Per case (a parallel layout on 1 or 2 gloo processes on this machine), every rank:
- export: our synchronous export (`write_checkpoint` of `export_pieces(copy=False)` with the specs announced,
  so pieces are made one at a time) against `save_file` of the whole HF state dict from rank 0;
- the HF export callback, synchronous and asynchronous: how long `export()` blocks the training loop, how
  long the export takes, and how much compute a busy loop loses while the background write runs;
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
    from bridges.export.specs import export_pieces, export_specs, hf_tensor_specs
    from bridges.export.writer import write_checkpoint
    from bridges.load import import_weights
    from bridges.rules.local_params import local_params
    from bridges.megatron import build, parallel
    from bridges.megatron.layout import ParallelLayout
    from bridges.models import glm45
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

    def our_export(out=ours_dir):
        write_checkpoint(export_pieces([model], glm45, arch, copy=False), specs, out, group=group, fsync=False,
                         piece_specs=export_specs([model], glm45, arch))

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

    # ---- the callback: blocked time per export, sync and async; compute lost beside the async write
    hf_export_module.write_checkpoint = functools.partial(write_checkpoint, fsync=False)  # page cache, see above
    trainer = SimpleNamespace(global_step=0, global_rank=rank, world_size=world, loggers=[], datamodule=None,
                              default_root_dir=os.path.join(scratch, case), strategy=SimpleNamespace(layout=layout))
    module = SimpleNamespace(hf_source=None, params_dtype=torch.float32, arch=arch, family=glm45, model=model,
                             mtp_enabled=True)
    callback = HFExportCallback(dirpath=os.path.join(scratch, f"{case}_callback"), save_last=False)
    callback.on_fit_start(trainer, module)
    work = _Work(torch)
    idle_rate = work.rate(1.0)

    def callback_export(async_write: bool) -> dict:
        callback.async_write = async_write
        trainer.global_step += 1
        dist.barrier()
        start = time.perf_counter()
        callback.export(trainer, module)
        blocked = time.perf_counter() - start
        done, busy = 0, time.perf_counter()
        while callback._thread is not None and callback._thread.is_alive():  # training goes on meanwhile
            work.step()
            done += 1
        busy = time.perf_counter() - busy
        callback.on_train_end(trainer, module)  # waits for the write (save_last=False: nothing new)
        seconds = callback.history[-1]["seconds"]
        dist.barrier()
        if rank == 0:
            shutil.rmtree(callback.history[-1]["path"])
        return {"blocked": blocked, "seconds": seconds, "lost_compute": max(0.0, busy - done / idle_rate)}

    def callback_runs(n: int) -> dict:
        runs = {"sync": [], "async": []}
        for r in range(n):
            for async_write in ((False, True) if r % 2 == 0 else (True, False)):
                runs["async" if async_write else "sync"].append(callback_export(async_write))
        return runs

    figures["callback"] = callback_runs(repeats)
    if durable_runs:  # the callback as it ships: fsync before publishing, so the disk sets the pace
        hf_export_module.write_checkpoint = write_checkpoint
        figures["callback_durable"] = callback_runs(durable_runs)
        hf_export_module.write_checkpoint = functools.partial(write_checkpoint, fsync=False)
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
    for label, fn in (("library sync", our_export), ("callback sync", lambda: callback_export(False)),
                      ("callback async", lambda: callback_export(True))):
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


class _Work:
    """A stand-in for training compute: small matrix products, one thread (as every rank here)."""

    def __init__(self, torch):
        self.a = torch.randn(256, 256)

    def step(self) -> None:
        self.a = (self.a @ self.a).tanh_()

    def rate(self, seconds: float) -> float:
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            self.step()
            n += 1
        return n / (time.perf_counter() - start)


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
        "sync_blocked": med(x["blocked"] for x in r0["callback"]["sync"]),
        "async_blocked": med(max(r["callback"]["async"][i]["blocked"] for r in ranks) for i in range(len(r0["callback"]["async"]))),
        "async_seconds": med(x["seconds"] for x in r0["callback"]["async"]),
        "async_lost_compute": med(max(r["callback"]["async"][i]["lost_compute"] for r in ranks)
                                  for i in range(len(r0["callback"]["async"]))),
        "import_ours": med(r0["import"]["ours"]), "import_load_file": med(r0["import"]["load_file"]),
        "durable": {
            "runs": len(r0["callback_durable"]["sync"]),
            "sync_blocked": med(x["blocked"] for x in r0["callback_durable"]["sync"]),
            "async_blocked": med(x["blocked"] for x in r0["callback_durable"]["async"]),
            "async_seconds": med(x["seconds"] for x in r0["callback_durable"]["async"]),
            "async_lost_compute": med(x["lost_compute"] for x in r0["callback_durable"]["async"]),
        } if r0.get("callback_durable") else None,
        "per_rank": [
            {"own_param_bytes": r["own_param_bytes"], "written_bytes": r["written_bytes"],
             "bytes_read": r["import"]["bytes_read"], "memory": r["memory"],
             "import_peak_extra": r["import"]["peak_extra"], "largest_local_param": r["largest_local_param"]}
            for r in ranks
        ],
        "runs": {  # every run, in seconds (rank 0)
            "export": r0["export"], "import": {k: r0["import"][k] for k in ("ours", "load_file")},
            "callback": {mode: [x["blocked"] for x in runs] for mode, runs in r0["callback"].items()},
        },
    }


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
