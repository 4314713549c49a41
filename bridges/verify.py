"""Check an HF checkpoint against our conversion: import -> export bit for bit, and logits vs transformers.

`torchrun --nproc-per-node N -m bridges.verify HF_DIR --tp .. --pp .. --ep ..` (or `python -m bridges.verify
HF_DIR` for one process). Prints a report on rank 0; exits non-zero when anything differs.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bridges.checkpoint import hf_config as hfc
from bridges.checkpoint import mxfp4
from bridges.export.specs import export_specs, export_pieces
from bridges.load import import_weights
from bridges.megatron import build, cpu_runtime, parallel
from bridges.megatron.forward import main_logits
from bridges.megatron.layout import ParallelLayout
from bridges.errors import debug, user_errors
from bridges.models import family_for
from bridges.checkpoint.pieces import region_shape
from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
from bridges.rules.vision_tower import VisionTower


@dataclass
class VerifyReport:
    layout: ParallelLayout
    imported: int = 0  # Megatron tensors filled, all ranks
    ignored: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    exported: int = 0  # HF tensors written by the export, all ranks together
    differ: list[str] = field(default_factory=list)  # HF tensors not bit-identical after the round trip
    not_covered: list[str] = field(default_factory=list)  # source tensors the export misses or overlaps
    max_abs_diff: float = float("nan")
    cosine: float = float("nan")

    @property
    def ok(self) -> bool:
        return not self.differ and not self.not_covered

    def text(self) -> str:
        lines = [
            f"layout: tp={self.layout.tp} pp={self.layout.pp} ep={self.layout.ep} etp={self.layout.expert_tp}",
            f"import: {self.imported} Megatron tensors loaded (all ranks), {len(self.ignored)} HF tensors ignored",
            *[f"  ignored {name}: {why}" for name, why in sorted(self.ignored.items())],
            *[f"  warning: {w}" for w in self.warnings],
            f"export: {self.exported} HF tensors, {len(self.differ)} not bit-identical, "
            f"{len(self.not_covered)} not covered once",
            *[f"  differs: {name}" for name in self.differ],
            *[f"  coverage: {name}" for name in self.not_covered],
            f"logits vs transformers: max abs diff {self.max_abs_diff:.3e}, cosine {self.cosine:.9f}",
        ]
        return "\n".join(lines)


def verify(
    hf_dir: str, layout: ParallelLayout, sequences: int = 3, seq_length: int = 16, seed: int = 0,
    device: str | None = None,
) -> VerifyReport:
    """Every rank calls this after torch.distributed is initialised; the report is complete on rank 0.
    `device`: "cpu" or "cuda" (None: the one the process group was made for)."""
    config = hfc.load_config(hf_dir)
    family = family_for(config)
    arch = family.architecture(config)
    dtype = hfc.dtype(config)
    parallel.initialize(layout, device=device)
    if isinstance(arch.extra.get("vision"), VisionTower):  # text-only logits; the tower's weights round trip
        from bridges.megatron.vlm import build_vlm_model

        model = build_vlm_model(arch, layout)
    else:
        model = build.build_gpt_model(arch, layout)
    source = mxfp4.dequantized(SafetensorsCheckpoint(hf_dir))  # MXFP4 experts: compared dequantized
    imported = import_weights([model], family, arch, source, config=config)
    report = VerifyReport(layout, ignored=imported.ignored, warnings=_gather_list(imported.warnings))
    report.imported = sum(_gather_list([len(imported.loaded)]))

    # Round trip: each rank compares the pieces it owns; coverage is checked on metadata from all ranks.
    # Optional tensors (MTP copies of the embedding / head) are compared only where the source has them.
    present = set(source.keys())
    rules = family.ruleset(arch, imported.expert_layout).hf_tensors()
    absent_optional = {name for name, (_, _, mirror) in rules.items() if mirror and name not in present}
    differ = [
        piece.spec.hf_name
        for piece in export_pieces([model], family, arch, dtype, imported.expert_layout)
        if piece.spec.hf_name not in absent_optional
        and not torch.equal(piece.tensor.cpu(), source.read(piece.spec.hf_name, piece.spec.region))
    ]
    report.differ = sorted(set(_gather_list(differ)))
    specs = export_specs([model], family, arch, dtype, imported.expert_layout)
    specs = _gather_list([(s.hf_name, s.region) for s in specs if s.hf_name not in absent_optional])
    expected = {n: source.shape(n) for n in source.keys() if n not in imported.ignored}
    report.not_covered = _coverage_problems(specs, expected)
    report.exported = len({name for name, _ in specs})

    ids = torch.randint(0, arch.vocab_size, (sequences, seq_length), generator=torch.Generator().manual_seed(seed))
    logits = main_logits(model, ids, arch.vocab_size)
    if dist.get_rank() == 0:
        reference = _transformers_logits(hf_dir, ids, config)
        report.max_abs_diff = (logits - reference).abs().max().item()
        report.cosine = torch.nn.functional.cosine_similarity(logits.flatten(), reference.flatten(), dim=0).item()
    return report


def _transformers_logits(hf_dir: str, ids: torch.Tensor, config: dict) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    kwargs = {}
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)  # the weights our import sees
    auto = AutoModelForImageTextToText if "vision_config" in config else AutoModelForCausalLM
    model = auto.from_pretrained(hf_dir, dtype=torch.float32, **kwargs)  # never trust_remote_code
    model.eval()
    with torch.no_grad():
        return model(ids).logits.float()


def _gather_list(items: list) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, list(items))
    return [x for part in out for x in part]


def _coverage_problems(specs, expected: dict[str, tuple[int, ...]]) -> list[str]:
    """Source tensors whose elements the export does not write exactly once."""
    counts = {name: torch.zeros(shape, dtype=torch.int32) for name, shape in expected.items()}
    extra = set()
    for name, region in specs:
        if name not in counts:
            extra.add(f"{name} (not in the source)")
        elif 0 not in region_shape(region):
            counts[name][region] += 1
    return sorted(extra | {name for name, c in counts.items() if not bool((c == 1).all())})


def _init_distributed(device: str) -> None:
    """One process: a free local port. Under torchrun: its rendezvous; on GPU each rank takes the device
    LOCAL_RANK names, so the model, its inputs and NCCL's buffers live there."""
    if "RANK" not in os.environ:  # a single process, not started by torchrun: a port nobody holds
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bridges.verify", description=__doc__.split("\n")[0])
    parser.add_argument("hf_dir")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--sequences", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--atol", type=float, default=1e-4, help="largest logit difference that passes")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=cpu_runtime.default_device(),
                        help="where Megatron runs (default: cuda when there is one)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except user_errors() as e:  # one line on every rank; the ranks agreed on import failures
        if debug():
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        return 2


def _run(args) -> int:
    if not dist.is_initialized():
        _init_distributed(args.device)
    layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp)
    try:
        report = verify(args.hf_dir, layout, args.sequences, args.seq_length, device=args.device)
    finally:
        parallel.destroy()
    ok = report.ok and report.max_abs_diff <= args.atol if dist.get_rank() == 0 else True
    if dist.get_rank() == 0:
        print(report.text())
        print("verify: OK" if ok else "verify: FAILED")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
