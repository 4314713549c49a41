"""Performance settings of the Megatron model (activation recompute, MoE dispatch and fusions) and a
pass-through for any other TransformerConfig field: validated here, before any process starts.

Model-independent: the same knobs apply to every family. Hydra keys live under `model.` (conf/config.yaml).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

RECOMPUTE = (None, "selective", "full")
DISPATCHERS = ("auto", "alltoall", "allgather", "flex")
# Fields the layout, the architecture and the precision decide: a pass-through must not change them.
_OWNED = {
    "num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size", "kv_channels",
    "num_moe_experts", "moe_ffn_hidden_size", "tensor_model_parallel_size", "pipeline_model_parallel_size",
    "expert_model_parallel_size", "expert_tensor_parallel_size", "sequence_parallel", "params_dtype",
    "pipeline_dtype", "bf16", "fp16", "mtp_num_layers", "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage", "virtual_pipeline_model_parallel_size",
}


class KnobError(ValueError):
    """A performance setting that cannot run (one line, naming the key)."""


@dataclass(frozen=True)
class ModelKnobs:
    recompute: str | None = None  # activation recompute: None, "selective" or "full"
    recompute_modules: tuple[str, ...] | None = None  # selective: Megatron's module names (None: core_attn)
    recompute_num_layers: int = 1  # full: layers per recomputed chunk
    moe_token_dispatcher: str = "auto"  # auto: alltoall on GPU (allgather on CPU)
    moe_grouped_gemm: bool | str = "auto"  # auto: with Transformer Engine's TEGroupedMLP
    moe_permute_fusion: bool = False  # Transformer Engine's fused token permutation
    cross_entropy_fusion: bool = False  # Megatron's fused vocab-parallel cross entropy
    overrides: dict[str, Any] = field(default_factory=dict)  # any other TransformerConfig field

    def __post_init__(self):
        check(self)

    @staticmethod
    def from_config(node: dict | None) -> "ModelKnobs":
        """From the `model.` config node (its other keys, e.g. hf_config, are not knobs)."""
        node = dict(node or {})
        names = {f.name for f in dataclasses.fields(ModelKnobs)}
        knobs = {k: v for k, v in node.items() if k in names}
        if knobs.get("recompute_modules") is not None:
            knobs["recompute_modules"] = tuple(knobs["recompute_modules"])
        knobs["overrides"] = dict(knobs.get("overrides") or {})
        return ModelKnobs(**knobs)

    def megatron_fields(self, on_gpu: bool, te_layers: bool) -> dict[str, Any]:
        """TransformerConfig fields for a run on GPU or CPU, with or without TE layers."""
        out: dict[str, Any] = {}
        if self.recompute == "selective":
            out.update(recompute_granularity="selective", recompute_modules=list(self.recompute_modules or ["core_attn"]))
        elif self.recompute == "full":
            out.update(recompute_granularity="full", recompute_method="uniform",
                       recompute_num_layers=self.recompute_num_layers)
        dispatcher = self.moe_token_dispatcher
        out["moe_token_dispatcher_type"] = ("alltoall" if on_gpu else "allgather") if dispatcher == "auto" else dispatcher
        grouped = te_layers if self.moe_grouped_gemm == "auto" else bool(self.moe_grouped_gemm)
        if grouped and not te_layers:
            raise KnobError("model.moe_grouped_gemm=true needs Transformer Engine's TEGroupedMLP (TE installed, a "
                            "GPU run); without it the experts run as SequentialMLP: set it to auto or false")
        if self.moe_permute_fusion and not te_layers:
            raise KnobError("model.moe_permute_fusion=true needs Transformer Engine (TE installed, a GPU run)")
        out.update(moe_grouped_gemm=grouped, moe_use_legacy_grouped_gemm=False,
                   moe_permute_fusion=bool(self.moe_permute_fusion),
                   cross_entropy_loss_fusion=bool(self.cross_entropy_fusion), cross_entropy_fusion_impl="native")
        out.update(self.overrides)
        return out


def check(knobs: ModelKnobs) -> None:
    """Every knob's value, and every `model.overrides` key, before any process starts."""
    if knobs.recompute not in RECOMPUTE:
        raise KnobError(f"model.recompute must be null, selective or full, got {knobs.recompute!r}")
    if knobs.recompute_num_layers < 1:
        raise KnobError(f"model.recompute_num_layers must be >= 1, got {knobs.recompute_num_layers}")
    if knobs.moe_token_dispatcher not in DISPATCHERS:
        raise KnobError(f"model.moe_token_dispatcher must be one of {', '.join(DISPATCHERS)}, "
                        f"got {knobs.moe_token_dispatcher!r}")
    if knobs.moe_grouped_gemm not in ("auto", True, False):
        raise KnobError(f"model.moe_grouped_gemm must be auto, true or false, got {knobs.moe_grouped_gemm!r}")
    from megatron.core.transformer import TransformerConfig

    fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for key in knobs.overrides:
        if key not in fields:
            raise KnobError(f"model.overrides.{key}: not a field of Megatron-Core's TransformerConfig")
        if key in _OWNED:
            raise KnobError(f"model.overrides.{key}: set by the model config, the parallel layout or "
                            f"trainer.precision, not by an override")
