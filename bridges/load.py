"""Import, in memory: an HF checkpoint (`HFSource`) -> this rank's Megatron shards.

Every rank checks the whole checkpoint's metadata and its own parameters first, and all ranks agree on
the findings (a collective on the default group) before any parameter changes, so no rank hangs and a
checkpoint that does not fit changes nothing. Then each rank streams: it reads only the regions one
parameter needs, converts them and copies them in, one parameter at a time, so memory beyond the model
stays within the largest parameter and a bounded amount of mapped file pages, and every byte is read once.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from bridges.checkpoint import mxfp4
from bridges.checkpoint.hf_config import HFConfigError
from bridges.rules.expert_layouts import ExpertLayout
from bridges.rules.local_params import Ranks, local_params
from bridges.architecture import GPTArchitecture
from bridges.models import family_of
from bridges.models.family import Family
from bridges.checkpoint.pieces import HFSource, region_shape
from bridges.rank_status import global_rank, group_rank_and_size
from bridges.rules.rule import RuleSet
from bridges.rules.sharding import ShardingError

_SHOWN_ERRORS = 30
# File pages mapped while reading stay resident until the maps are released: released after this many bytes.
RELEASE_BYTES = 256 * 2**20
# The MTP copies of the embedding / output head are compared on this many bytes of each rank's region,
# in blocks of rows spread over it (see _check_mirrors).
MIRROR_SAMPLE_BYTES, MIRROR_BLOCKS = 2**20, 4


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the model (nothing was loaded), or a file failed to read after every check
    passed (the model is partly loaded; the message says which). `errors` lists the ranks' findings."""

    def __init__(self, stage: str, errors: list[str], changed: bool = False):
        self.errors = errors
        shown = "\n  ".join(errors[:_SHOWN_ERRORS])
        more = f"\n  ... and {len(errors) - _SHOWN_ERRORS} more" if len(errors) > _SHOWN_ERRORS else ""
        outcome = ("every check had passed and the parameters read before the failure were loaded: the model is "
                   "partly loaded, do not use it" if changed else "no parameter was changed")
        super().__init__(f"HF import failed while {stage}; {outcome}:\n  {shown}{more}")


@dataclass
class ImportReport:
    loaded: list[str] = field(default_factory=list)  # local Megatron names filled on this rank
    ignored: dict[str, str] = field(default_factory=dict)  # HF name -> why it was not loaded
    warnings: list[str] = field(default_factory=list)  # e.g. MTP copies that differ from the main weights
    expert_layout: ExpertLayout | None = None  # None: not decided (the checkpoint could not be read)
    dequantized: list[str] = field(default_factory=list)  # HF tensors read from MXFP4 blocks / scales


def import_weights(
    model_chunks, family: Family | str, arch: GPTArchitecture, source: HFSource, dtype: torch.dtype | None = None,
    config: dict | None = None, ranks: Ranks | None = None, group=None,
) -> ImportReport:
    """Load `source` into this rank's model chunks (every rank calls this together).

    `dtype`: the checkpoint dtype the tensors must have (None: the dtype most of them have).
    `config`: the checkpoint's config.json, checked against `arch` when given.
    MXFP4 tensors (`X_blocks` / `X_scales`) are read as X, dequantized region by region (bridges/checkpoint/mxfp4.py).
    Raises `CheckpointMismatch` on every rank when any rank finds a problem; a checkpoint that does not fit
    changes no parameter (only a file that fails to read after every check passed leaves the model partly loaded).
    """
    ranks = ranks or Ranks.current()
    family = family_of(family)
    errors = []
    try:
        source = mxfp4.dequantized(source, dtype)
    except mxfp4.MXFP4Error as e:  # agreed below with the other findings
        errors.append(str(e))
    report = ImportReport()
    report.expert_layout = _expert_layout(family, source, arch, config, report, errors)
    report.dequantized = sorted(getattr(source, "quantized", ()))
    ruleset = family.ruleset(arch, report.expert_layout)
    errors += check_source(ruleset, source, dtype, report)
    if config is not None:
        errors += check_config(family, arch, config)
    plan, plan_errors = _plan(model_chunks, ruleset, ranks)
    _agree("checking the checkpoint", errors + plan_errors, group)
    _agree("reading the checkpoint", _stream(plan, source, report, ranks), group, changed=True)
    return report


def _expert_layout(family: Family, source: HFSource, arch: GPTArchitecture, config: dict | None,
                   report: ImportReport, errors: list[str]) -> ExpertLayout:
    """The checkpoint's expert layout (its notes become report warnings); on failure the family's default, the
    error agreed with the other findings."""
    try:
        found = family.detect(source, arch, config)
    except ValueError as e:
        errors.append(str(e))
        return family.default_layout
    report.warnings += found.notes
    return found.layout


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


def check_config(family: Family, arch: GPTArchitecture, config: dict) -> list[str]:
    """The checkpoint's config.json against the architecture the model was built with."""
    try:
        source = family.architecture(config)
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


def _stream(plan, source: HFSource, report: ImportReport, ranks: Ranks) -> list[str]:
    """Read, convert and copy in each planned parameter in turn; stops at the first failure (returned)."""
    check_mirrors = ranks.replica(expert=False)[0] == 0  # the copies are the same on every replica: one checks
    unreleased = 0
    with torch.no_grad():
        for param, rule, rank, size in plan:
            specs = rule.specs(rank, size, param.tensor.dtype)
            try:
                values = [_read_region(source, s) for s in specs]
                param.tensor.data.copy_(rule.to_megatron(values, rank, size))
            except Exception as e:  # noqa: BLE001 - any read failure must be agreed on, not raised alone
                names = [s.hf_name for s in specs]
                _release_pages(source)
                return [f"{param.local_name}: reading {names} from {source.where(names[0])} failed: {e}"]
            report.loaded.append(param.local_name)
            if check_mirrors:
                _check_mirrors(rule, specs, values, source, report)
            unreleased += sum(_mapped_bytes(s, v) for s, v in zip(specs, values))
            del values
            if unreleased >= RELEASE_BYTES:
                _release_pages(source)
                unreleased = 0
    _release_pages(source)
    return []


def _mapped_bytes(spec, values: torch.Tensor) -> int:
    """Bytes of the file that reading a region maps, at most: all columns of the leading rows it spans (a
    tensor-parallel column shard maps the whole rows; the kernel maps whole folios around what is read)."""
    rows = spec.region[0] if spec.region else slice(0, 1, 1)
    count = len(range(rows.start, rows.stop, rows.step))
    return ((count - 1) * rows.step + 1 if count else 0) * math.prod(spec.hf_shape[1:]) * values.element_size()


def _release_pages(source: HFSource) -> None:
    """Unmap the file pages the source keeps mapped (a directory's checkpoint does; in-memory sources do not)."""
    release = getattr(source, "release_pages", None)
    if release is not None:
        release()


def _read_region(source: HFSource, spec) -> torch.Tensor:
    shape = region_shape(spec.region)
    return torch.empty(shape) if 0 in shape else source.read(spec.hf_name, spec.region)  # padding-only shard


def _check_mirrors(rule, specs, values, source: HFSource, report: ImportReport) -> None:
    """MTP copies of the embedding / output weight must equal them (servers read the copies). Compared on
    MIRROR_BLOCKS blocks of rows spread over this rank's region, MIRROR_SAMPLE_BYTES in all: a copy that
    differs (another training, another init) differs nearly everywhere, and a full comparison would read
    the copy whole. Blocks, not single rows: a sparse read maps whole file folios (the memory counts)."""
    main = values[0]
    if not rule.mirrors or 0 in main.shape:
        return
    present = set(source.keys())
    rows, region = main.shape[0], specs[0].region
    block = max(1, MIRROR_SAMPLE_BYTES // MIRROR_BLOCKS // (main[0].numel() * main.element_size()))
    starts = sorted({min(rows - block, rows * i // MIRROR_BLOCKS) if rows > block else 0 for i in range(MIRROR_BLOCKS)})
    for mirror in (m for m in rule.mirrors if m in present):
        for start in starts:
            stop = min(rows, start + block)
            first = region[0].start + start * region[0].step
            sub = (slice(first, first + (stop - start) * region[0].step, region[0].step),) + tuple(region[1:])
            if not torch.equal(source.read(mirror, sub), main[start:stop]):
                report.warnings.append(
                    f"{mirror} ({source.where(mirror)}) differs from {rule.hf[0]}; the export writes {rule.hf[0]} there"
                )
                break


def _agree(stage: str, errors: list[str], group=None, changed: bool = False) -> None:
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
        raise CheckpointMismatch(stage, merged, changed)
