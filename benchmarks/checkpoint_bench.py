"""Sharded Lightning checkpoint save / load against the HF export of the same model: seconds and bytes.

World 2 (EP2) on CPU, gloo; a few training steps, each followed by a synchronous HF export, then
checkpoints (`trainer.save_checkpoint`) of the same state; further runs resume from them (load timed). Writes
docs/benchmarks_checkpoint.json and the checkpoint section of docs/benchmarks.md.

    python benchmarks/checkpoint_bench.py [--precision bf16] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# GLM-4.5 family, big enough that file I/O shows: 4 layers (1 dense) + MTP, 16 experts + 1 shared, hidden 256.
MODEL = {"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256, "n_routed_experts": 16,
         "vocab_size": 32000, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 32}


def _model_dir(tmp: str) -> str:
    config = json.load(open(os.path.join(ROOT, "conf/model/glm45_tiny/config.json")))
    config.update(MODEL)
    os.makedirs(f"{tmp}/model", exist_ok=True)
    json.dump(config, open(f"{tmp}/model/config.json", "w"))
    return f"{tmp}/model"


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _run(tmp: str, model_dir: str, precision: str, runs: int) -> dict:
    import lightning.pytorch as pl
    import torch.distributed as dist

    from callbacks.hf_export import HFExportCallback
    from recipes.data import TokenDataModule
    from recipes.module import MegatronGPTModule
    from recipes.strategy import MegatronStrategy

    out = {"save": [], "load": [], "export": []}

    def trainer_for(callbacks, max_steps):
        return pl.Trainer(accelerator="cpu", devices=dist.get_world_size(), strategy=MegatronStrategy(ep=2),
                          max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                          callbacks=callbacks)

    def parts():
        module = MegatronGPTModule(model_dir, micro_batch_size=1, params_dtype=precision)
        data = TokenDataModule(seq_length=32, micro_batch_size=1, global_batch_size=2, num_samples=16)
        data.vocab_size = module.arch.vocab_size
        return module, data

    class Measure(pl.Callback):
        def on_train_end(self, trainer, module):
            for i in range(runs):
                path = f"{tmp}/ckpt_{i}"
                dist.barrier()
                start = time.perf_counter()
                trainer.save_checkpoint(path)
                dist.barrier()
                out["save"].append(time.perf_counter() - start)
            out["param_count"] = _parameter_count(module.model)

    export = HFExportCallback(dirpath=f"{tmp}/hf", every_n_train_steps=1, async_write=False, save_last=False)
    module, data = parts()
    trainer_for([Measure(), export], runs).fit(module, datamodule=data)  # an HF export after every step
    out["export"] = [h["seconds"] for h in export.history]
    strategy_cls = MegatronStrategy
    original = strategy_cls.load_optimizer_state_dict

    def timed(self, checkpoint):
        dist.barrier()
        start = time.perf_counter()
        original(self, checkpoint)
        dist.barrier()
        out["load"].append(time.perf_counter() - start)

    strategy_cls.load_optimizer_state_dict = timed
    try:
        for i in range(runs):
            module, data = parts()
            trainer_for([], runs + 1).fit(module, datamodule=data, ckpt_path=f"{tmp}/ckpt_{i}")
    finally:
        strategy_cls.load_optimizer_state_dict = original
    if dist.get_rank() == 0:
        out["checkpoint_bytes"] = _du(f"{tmp}/ckpt_0")
        latest = sorted(d for d in os.listdir(f"{tmp}/hf") if d.startswith("step_"))[-1]
        out["export_bytes"] = _du(f"{tmp}/hf/{latest}")
    return out


def _parameter_count(model) -> int:
    """Parameters of the whole model (every rank's unique ones), counted on this rank's shards."""
    import torch
    import torch.distributed as dist

    expert = sum(p.numel() for p in model.parameters() if not getattr(p, "allreduce", True))
    dense = sum(p.numel() for p in model.parameters() if getattr(p, "allreduce", True))
    total = torch.tensor([expert], dtype=torch.float64)
    dist.all_reduce(total)  # experts are split over EP2; dense weights are replicated
    return int(total.item() + dense)


def section(figures: dict) -> list[str]:
    """The checkpoint section of docs/benchmarks.md."""
    lines = ["", "## Lightning checkpoint against the HF export", "",
             "benchmarks/checkpoint_bench.py: world 2 (EP2), CPU, gloo, GLM-4.5 family (4 layers, 16 experts + 1 shared, "
             "hidden 256, vocab 32000, MTP 1). `trainer.save_checkpoint` (Megatron dist_checkpointing, `torch_dist`: "
             "model, optimizer fp32 copy, Adam moments, Lightning state) against a synchronous HF export (weights "
             "only) of the same model; load = the model and optimizer state read back when resuming. Slowest rank, "
             "medians of the runs; page cache, no fsync. Parameters: the Megatron model's; the HF export also holds "
             "the MTP layer's own copies of the embedding and the output head (GLM-4.5's layout), hence more than "
             "4 (fp32) or 2 (bf16) bytes per parameter. The tests of this suite ran beside the measurement.", "",
             "| precision | parameters | checkpoint save (s) | checkpoint load (s) | HF export (s) | checkpoint (MB) | "
             "HF export (MB) | checkpoint bytes / parameter | export bytes / parameter | machine |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for f in figures["cases"]:
        n = f["param_count"]
        lines.append(f"| {f['precision']} | {n / 1e6:.1f} M | {statistics.median(f['save']):.2f} | "
                     f"{statistics.median(f['load']):.2f} | {statistics.median(f['export']):.2f} | "
                     f"{f['checkpoint_bytes'] / 1e6:.0f} | {f['export_bytes'] / 1e6:.0f} | "
                     f"{f['checkpoint_bytes'] / n:.1f} | {f['export_bytes'] / n:.1f} | {figures['machine']} |")
    lines.append("")
    return lines


def splice(markdown: str, figures: dict) -> str:
    """Replace (or add, before "Where we stand") the checkpoint section of docs/benchmarks.md."""
    title = "## Lightning checkpoint against the HF export"
    body = "\n".join(section(figures))
    if title in markdown:
        start = markdown.index("\n" + title)
        end = markdown.find("\n## ", start + len(title) + 1)
        return markdown[:start] + body.rstrip("\n") + ("\n" + markdown[end:] if end != -1 else "\n")
    anchor = markdown.find("\n## Where we stand")
    if anchor == -1:
        return markdown.rstrip("\n") + "\n" + body
    return markdown[:anchor] + body.rstrip("\n") + "\n" + markdown[anchor:]


def main() -> None:
    from tests.launcher import run_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()
    figures = {"machine": f"{os.cpu_count()} cores, load {load[0]:.1f}", "cases": []}
    for precision in args.precision:
        tmp = tempfile.mkdtemp(prefix="ckpt-bench-")
        try:
            result = run_distributed(2, _run, tmp, _model_dir(tmp), precision, args.runs, timeout=1800)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        case = {**result[0], "precision": precision}
        case["save"] = [max(a, b) for a, b in zip(result[0]["save"], result[1]["save"])]
        case["load"] = [max(a, b) for a, b in zip(result[0]["load"], result[1]["load"])]
        case["export"] = [max(a, b) for a, b in zip(result[0]["export"], result[1]["export"])]
        figures["cases"].append(case)
    docs = os.path.join(ROOT, "docs")
    with open(os.path.join(docs, "benchmarks_checkpoint.json"), "w") as f:
        json.dump(figures, f, indent=1)
    path = os.path.join(docs, "benchmarks.md")
    with open(path) as f:
        markdown = f.read()
    with open(path, "w") as f:
        f.write(splice(markdown, figures))
    print("\n".join(section(figures)))


if __name__ == "__main__":
    main()
