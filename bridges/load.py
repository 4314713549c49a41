"""Import, in memory: an HF checkpoint (`HFSource`) -> this rank's Megatron shards, all or nothing.

Every rank checks the whole checkpoint's metadata and its own parameters first, then reads only the
regions its parameters need into a staging copy; after each step all ranks agree on failure (an
all-reduce on the default group) before any parameter changes, so no rank hangs and no model is half loaded.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bridges.checkpoint import mxfp4
from bridges.checkpoint.hf_config import HFConfigError
from bridges.rules.local_params import Ranks, local_params
from bridges.architecture import GPTArchitecture
from bridges.models import family_module
from bridges.checkpoint.pieces import HFSource, region_shape
from bridges.rank_status import global_rank, group_rank_and_size
from bridges.rules.rule import RuleSet
from bridges.rules.sharding import ShardingError

_SHOWN_ERRORS = 30


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model; nothing was loaded. `errors` lists this rank's findings."""

    def __init__(self, stage: str, errors: list[str]):
        self.errors = errors
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        super().__init__(f"HF import failed while {stage}; no parameter was changed:\n  {shown}{more}")


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)  # local Megatron names filled on this rank
    ignored: dict[str, str] = field(default_factory=dict)  # HF name -> why it was not loaded
    warnings: list[str] = field(default_factory=list)  # e.g. MTP copies that differ from the main weights
    expert_layout: str = ""
    dequantized: list[str] = field(default_factory=list)  # HF tensors read from MXFP4 blocks / scales


def import_weights(
    model_chunks, family, arch: GPTArchitecture, source: HFSource, dtype: torch.dtype | None = None,
    config: dict | None = None, ranks: Ranks | None = None, group=None,
) -> ImportReport:
    """Load `source` into this rank's model chunks (every rank calls this together).

    `dtype`: the checkpoint dtype the tensors must have (None: the dtype most of them have).
    `config`: the checkpoint's config.json, checked against `arch` when given.
    MXFP4 tensors (`X_blocks` / `X_scales`) are read as X, dequantized region by region (bridges/checkpoint/mxfp4.py).
    Raises `CheckpointMismatch` on every rank when any rank finds a problem.
    """
    ranks = ranks or Ranks.current()
    module = family_module(family)
    errors = []
    try:
        source = mxfp4.dequantized(source, dtype)
    except mxfp4.MXFP4Error as e:  # agreed below with the other findings
        errors.append(str(e))
    report = ImportReport()
    report.expert_layout = _expert_layout(module, source, arch, config, report, errors)
    report.dequantized = sorted(getattr(source, "quantized", ()))
    ruleset = module.rules(arch, report.expert_layout)
    errors += check_source(ruleset, source, dtype, report)
    if config is not None:
        errors += check_config(module, arch, config)
    plan, plan_errors = _plan(model_chunks, ruleset, ranks)
    _agree("checking the checkpoint", errors + plan_errors, group)

    staged, read_errors = _read(plan, source, report)
    _agree("reading the checkpoint", read_errors, group)
    with torch.no_grad():
        for param, values in staged:
            param.tensor.data.copy_(values)
            report.loaded.append(param.local_name)
    return report


def _expert_layout(module, source: HFSource, arch: GPTArchitecture, config: dict | None, report: ImportReport,
                   errors: list[str]) -> str:
    """The checkpoint's expert layout. Families whose layouts differ in shape, not names (Qwen3-VL-MoE),
    decide with `expert_layout_of(source, arch, config)` -> (layout, notes); notes become report warnings."""
    if not hasattr(module, "expert_layout_of"):
        return module.detect_expert_layout(source.keys())
    try:
        layout, notes = module.expert_layout_of(source, arch, config)
    except ValueError as e:  # agreed below with the other findings
        errors.append(str(e))
        return module.EXPERT_LAYOUTS[0]
    report.warnings += notes
    return layout


def check_source(ruleset: RuleSet, source: HFSource, dtype: torch.dtype | None, report: ImportReport) -> list[str]:
    """Names, shapes and dtypes of the whole checkpoint against the rules (metadata only)."""
    expected = ruleset.hf_tensors()
    present = set(source.keys())
    dtype = dtype or _usual_dtype(source, [n for n in present if n in expected and expected[n][1] is None])
    errors = []
    for name in sorted(present):
        where = source.where(name)
        if name not in expected:
            reason = ruleset.hf_ignore_reason(name)
            if reason is None:
                errors.append(f"{name} ({where}): unexpected tensor, no rule maps it")
            else:
                report.ignored[name] = reason
            continue
        shape, fixed, _ = expected[name]
        if tuple(source.shape(name)) != tuple(shape):
            errors.append(f"{name} ({where}): expected shape {tuple(shape)}, found {tuple(source.shape(name))}")
        allowed = {dtype} | ({fixed} if fixed else set()) | set(ruleset.accepted_dtypes(name))
        if source.dtype(name) not in allowed:
            want = " or ".join(sorted(str(d) for d in allowed))
            errors.append(f"{name} ({where}): expected dtype {want}, found {source.dtype(name)}")
    for name, (_, _, mirror) in expected.items():
        if name in present:
            continue
        if mirror:  # a copy of a main weight: loading does not need it
            report.warnings.append(f"{name}: missing in {_location(source, name)} (a copy of a main weight)")
        else:
            errors.append(f"{name}: missing in {_location(source, name)}")
    return errors


def _location(source: HFSource, name: str) -> str:
    """Where `name` is, or would be: the file holding it, else the checkpoint (a missing name has no file)."""
    try:
        return source.where(name)
    except KeyError:
        inner = getattr(source, "source", source)  # a dequantizing view names its checkpoint
        return str(getattr(inner, "directory", "the checkpoint"))


def check_config(module, arch: GPTArchitecture, config: dict) -> list[str]:
    """The checkpoint's config.json against the architecture the model was built with."""
    try:
        source = module.architecture(config)
    except HFConfigError as e:
        return [f"config.json: {e}"]
    errors = [
        f"config.json {key}: checkpoint has {source.transformer.get(key)!r}, model has {arch.transformer.get(key)!r}"
        for key in sorted(set(arch.transformer) | set(source.transformer))
        if arch.transformer.get(key) != source.transformer.get(key)
    ]
    for key in ("vocab_size", "rotary_percent", "rotary_base", "yarn", "mrope", "tie_word_embeddings"):
        if getattr(arch, key) != getattr(source, key):
            errors.append(
                f"config.json {key}: checkpoint has {getattr(source, key)!r}, model has {getattr(arch, key)!r}"
            )
    if arch.mtp_num_layers > source.mtp_num_layers:
        errors.append(
            f"config.json: the model has {arch.mtp_num_layers} MTP layers, the checkpoint {source.mtp_num_layers}"
        )
    return errors


def _usual_dtype(source: HFSource, names: list[str]) -> torch.dtype | None:
    counts = collections.Counter(source.dtype(n) for n in names)
    return counts.most_common(1)[0][0] if counts else None


def _plan(model_chunks, ruleset: RuleSet, ranks: Ranks):
    """(param, rule, tp rank, tp size) for every local parameter, and what does not fit."""
    plan, errors = [], []
    for param in local_params(model_chunks, ranks):
        rule = ruleset.rule_for(param.name)
        if rule is None:
            if ruleset.megatron_ignore_reason(param.name) is None:
                errors.append(f"Megatron parameter {param.local_name} ({param.name}): no HF rule loads it")
            continue
        rank, size = ranks.tensor_parallel(rule.expert is not None)
        try:
            shape = rule.local_shape(rank, size)
        except ShardingError as e:
            errors.append(f"Megatron parameter {param.local_name}: {e}")
            continue
        if shape != tuple(param.tensor.shape):
            errors.append(
                f"Megatron parameter {param.local_name}: the checkpoint gives shape {shape} on this rank, "
                f"the model has {tuple(param.tensor.shape)} (config mismatch?)"
            )
            continue
        plan.append((param, rule, rank, size))
    return plan, errors


def _read(plan, source: HFSource, report: ImportReport):
    staged, errors = [], []
    for param, rule, rank, size in plan:
        specs = rule.specs(rank, size, param.tensor.dtype)
        try:
            values = [_read_region(source, s) for s in specs]
            staged.append((param, rule.to_megatron(values, rank, size)))
        except Exception as e:  # noqa: BLE001 - any read failure must be agreed on, not raised alone
            names = [s.hf_name for s in specs]
            errors.append(f"{param.local_name}: reading {names} from {source.where(names[0])} failed: {e}")
            continue
        _check_mirrors(rule, specs, values, source, report)
    return staged, errors


def _read_region(source: HFSource, spec) -> torch.Tensor:
    shape = region_shape(spec.region)
    return torch.empty(shape) if 0 in shape else source.read(spec.hf_name, spec.region)  # padding-only shard


def _check_mirrors(rule, specs, values, source: HFSource, report: ImportReport) -> None:
    """MTP copies of the embedding / output weight must equal them (servers read the copies)."""
    present = set(source.keys()) if rule.mirrors else set()
    for mirror in rule.mirrors:
        if mirror in present and 0 not in values[0].shape:
            if not torch.equal(source.read(mirror, specs[0].region), values[0]):
                report.warnings.append(
                    f"{mirror} ({source.where(mirror)}) differs from {rule.hf[0]}; the export writes {rule.hf[0]} there"
                )


def _agree(stage: str, errors: list[str], group=None) -> None:
    """Raise on every rank if any rank has errors, each rank's findings shown everywhere (collective)."""
    rank, world = group_rank_and_size(group)
    gathered = [(0, errors)] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(gathered, (global_rank(group, rank), errors[:_SHOWN_ERRORS]), group=group)
    ranks_by_error: dict[str, list[int]] = {}
    for r, found in gathered:
        for error in found:
            ranks_by_error.setdefault(error, []).append(r)
    if ranks_by_error:
        merged = [e if world == 1 else f"{e} (rank {', '.join(map(str, rs))})" for e, rs in ranks_by_error.items()]
        raise CheckpointMismatch(stage, merged)
