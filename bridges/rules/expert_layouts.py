"""How a checkpoint stores the routed experts of its MoE layers (`ExpertLayout`), and finding it out from the
tensors' names and shapes. The rule groups build a table per layout; a family lists the layouts it reads."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ExpertLayout(StrEnum):
    """One on-disk layout of the routed experts of a MoE layer (its value is what reports and logs say)."""

    PER_EXPERT = "per_expert"  # `experts.{e}.<gate>/<up>/<down>.weight`, one tensor per expert (hub, save_pretrained)
    FUSED = "fused"  # `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]: [E, out, in]
    FUSED_IN_OUT = "fused_in_out"  # `experts.gate_up_proj` [E, H, 2I] and `experts.down_proj` [E, I, H]: [E, in, out]


@dataclass(frozen=True)
class LayoutFound:
    """A checkpoint's expert layout and how it was decided, where that needed a guess (said to the user)."""

    layout: ExpertLayout
    notes: tuple[str, ...] = ()


FUSED_NAMES = ("gate_up_proj", "down_proj")  # fused expert tensors are `...experts.<name>` in either orientation


def detect_expert_layout(source, arch, config: dict | None, layouts: tuple[ExpertLayout, ...]) -> LayoutFound:
    """Per expert when the checkpoint has no fused expert tensor; else the orientation of every fused tensor
    from its shape against [E, in, out] / [E, out, in]. A tensor whose shape fits both (gate_up_proj when H == 2I,
    down_proj when H == I) takes the one fused orientation in `layouts` (the family's), or, when the family reads
    both, the checkpoint's `transformers_version` decides (5 or later: `save_pretrained`'s [E, out, in]; earlier
    or none: [E, in, out] as released), said in a note. Raises ValueError when the tensors disagree or fit
    neither orientation."""
    fused = {kind: sorted(n for n in source.keys() if n.endswith(f".experts.{kind}")) for kind in FUSED_NAMES}
    if not any(fused.values()):
        return LayoutFound(ExpertLayout.PER_EXPERT)
    t = arch.transformer
    hidden, ffn = t["hidden_size"], t["moe_ffn_hidden_size"]
    kinds = {"gate_up_proj": ((hidden, 2 * ffn), (2 * ffn, hidden)), "down_proj": ((ffn, hidden), (hidden, ffn))}
    verdicts: dict[str, ExpertLayout | None] = {}
    for kind, (in_out, out_in) in kinds.items():
        for name in fused[kind]:
            shape = tuple(source.shape(name))[1:]
            if shape not in (in_out, out_in):
                raise ValueError(f"{name} ({source.where(name)}): shape {tuple(source.shape(name))} is neither "
                                 f"[E, {in_out[0]}, {in_out[1]}] nor [E, {out_in[0]}, {out_in[1]}]")
            found = None if in_out == out_in else ExpertLayout.FUSED_IN_OUT if shape == in_out else ExpertLayout.FUSED
            if verdicts.setdefault(kind, found) != found:
                raise ValueError(f"{name} ({source.where(name)}) is stored in another orientation than other layers")
    version = str((config or {}).get("transformers_version") or "")
    by_version = ExpertLayout.FUSED if version and int(version.split(".")[0]) >= 5 else ExpertLayout.FUSED_IN_OUT
    readable = [layout for layout in (ExpertLayout.FUSED, ExpertLayout.FUSED_IN_OUT) if layout in layouts]
    notes = []
    for kind, found in verdicts.items():
        if found is None and len(readable) == 1:
            verdicts[kind] = readable[0]  # the family reads one orientation: nothing to guess
        elif found is None:
            verdicts[kind] = by_version
            notes.append(
                f"experts.{kind} is square per expert (hidden {hidden}, intermediate {ffn}), its shape cannot tell "
                f"the orientation; transformers_version {version or '(none)'} says "
                + ("[E, out, in] (save_pretrained)" if by_version == ExpertLayout.FUSED else
                   "[E, in, out] (released checkpoints)"))
    if len(set(verdicts.values())) > 1:
        said = f" ({notes[0]})" if notes else ""
        raise ValueError(f"expert tensors disagree on their orientation: {verdicts}{said}")
    return LayoutFound(next(iter(verdicts.values())), tuple(notes))


def always(layout: ExpertLayout):
    """A detector for a family that stores its experts one way only (GPT-OSS)."""

    def detect(source, arch, config: dict | None, layouts: tuple[ExpertLayout, ...]) -> LayoutFound:
        return LayoutFound(layout)

    return detect
