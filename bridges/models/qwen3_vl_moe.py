"""Qwen3-VL-MoE (`qwen3_vl_moe`): HF config <-> Megatron architecture, and the weight rule table.

Language model (`model.language_model.`): Qwen3-MoE-shaped decoder (QK norm, no biases, softmax top-k router
with renormalised top-k, routed experts only, dense layers per `mlp_only_layers` / `decoder_sparse_step`) with
interleaved multimodal rotary (`mrope_section`). Experts are fused: released checkpoints store them
`[E, in, out]` (`gate_up_proj` [E, H, 2I], gate then up; `down_proj` [E, I, H]), transformers 5
`save_pretrained` writes `[E, out, in]`; both import, and export keeps the import source's orientation.
Vision tower (`model.visual.`): transformers' `Qwen3VLMoeVisionModel`, weights passed through, deepstack
features added after the first `len(deepstack_visual_indexes)` decoder layers.
"""

from __future__ import annotations

import logging
from typing import Any

from bridges.checkpoint import hf_config as hfc
from bridges.checkpoint import vlm_config
from bridges.architecture import GPTArchitecture, MRoPE
from bridges.models import qwen3_moe
from bridges.models.qwen3_moe import moe_layer_pattern, num_experts
from bridges.rules.groups import FUSED, fused_expert, fused_gated_expert, routed_experts
from bridges.rules.rule import RuleSet
from bridges.rules.vision_tower import VisionTower

MODEL_TYPE = "qwen3_vl_moe"
TEXT = "model.language_model."
VISUAL = "model.visual."
IN_OUT = "fused_in_out"  # released checkpoints: gate_up_proj [E, H, 2I], down_proj [E, I, H]
EXPERT_LAYOUTS = (IN_OUT, FUSED)  # FUSED: transformers 5 save_pretrained, gate_up_proj [E, 2I, H], down_proj [E, H, I]
DEFAULT_MROPE_SECTION = (24, 20, 20)  # transformers' default when the config has none
DEFAULT_DEEPSTACK = (8, 16, 24)

log = logging.getLogger(__name__)


def architecture(config: dict[str, Any]) -> GPTArchitecture:
    """Megatron architecture (language model + vision tower spec) of an HF `qwen3_vl_moe` config."""
    if config.get("model_type") != MODEL_TYPE:
        raise hfc.HFConfigError(f"expected model_type {MODEL_TYPE!r}, got {config.get('model_type')!r}")
    refuse = lambda why: hfc.HFConfigError(f"qwen3_vl_moe: {why}")  # noqa: E731
    text = dict(hfc.require(config, "text_config"), model_type=MODEL_TYPE)
    vision = {k: v for k, v in hfc.require(config, "vision_config").items() if k != "model_type"}
    transformer = hfc.decoder_transformer(text, rms_norm_eps=1e-6)
    if text.get("attention_bias"):
        raise refuse("attention_bias=true is not supported (Megatron cannot bias o_proj alone)")
    rope = hfc.rope_parameters(text)
    if rope["rope_type"] not in ("default", None) or float(rope["partial_rotary_factor"]) != 1.0:
        raise refuse(f"rope {rope} is not supported (default rope over the whole head only)")
    experts = num_experts(text)
    pattern = moe_layer_pattern(text, transformer["num_layers"])
    aux = float(_aux_loss_coef(text))
    transformer.update(
        add_qkv_bias=False,
        qk_layernorm=True,
        num_moe_experts=experts,
        moe_ffn_hidden_size=int(hfc.require(text, "moe_intermediate_size")),
        moe_layer_freq=pattern,
        moe_router_topk=int(hfc.require(text, "num_experts_per_tok")),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=False,  # softmax over the top-k logits == transformers' renormalised top-k
        moe_router_load_balancing_type="aux_loss" if aux else "none",
        moe_aux_loss_coeff=aux,
    )
    tower = VisionTower(
        "Qwen3VLMoeVisionModel", "Qwen3VLMoeVisionConfig", vision,
        image_token_id=int(hfc.require(config, "image_token_id")),
        spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        deepstack_layers=len(vision.get("deepstack_visual_indexes", DEFAULT_DEEPSTACK)),
    )
    return GPTArchitecture(
        transformer=transformer,
        vocab_size=int(hfc.require(text, "vocab_size")),
        max_position_embeddings=int(text.get("max_position_embeddings", 128000)),
        rotary_base=float(rope["rope_theta"]),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        mrope=MRoPE(tuple(rope.get("mrope_section") or DEFAULT_MROPE_SECTION), interleaved=True),
        extra=vlm_config.extra(tower, config),
    )


def hf_config(arch: GPTArchitecture, source: dict[str, Any] | None = None, dtype=None) -> dict[str, Any]:
    """HF `qwen3_vl_moe` config (transformers 5 style) for a Megatron architecture. Token ids and other fields
    Megatron does not model come from `source` (the import source's config) or else the config `arch` was
    made from; `transformers_version` only from `source`, whose expert orientation the export keeps."""
    t = arch.transformer
    source = source or {}
    pattern = t["moe_layer_freq"]
    text = {k: v for k, v in (source.get("text_config") or {}).items() if k not in _TEXT_LEGACY_KEYS}
    text.update(hfc.decoder_fields(arch))
    text.update(
        model_type="qwen3_vl_moe_text",
        rope_parameters={"rope_type": "default", "rope_theta": arch.rotary_base,
                         "mrope_section": list(arch.mrope.section), "mrope_interleaved": True},
        attention_bias=False,
        moe_intermediate_size=t["moe_ffn_hidden_size"],
        num_experts=t["num_moe_experts"],
        num_experts_per_tok=t["moe_router_topk"],
        router_aux_loss_coef=t["moe_aux_loss_coeff"],
        decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(pattern) if not moe],
    )
    return vlm_config.compose(arch, source, text, "Qwen3VLMoeForConditionalGeneration", MODEL_TYPE,
                              "qwen3_vl_moe_vision", dtype)


# transformers 4 spellings replaced on export; `num_local_experts` by `num_experts` (read by every release).
_TEXT_LEGACY_KEYS = {"rope_theta", "rope_scaling", "partial_rotary_factor", "torch_dtype", "num_local_experts"}


# ---- expert orientation of a checkpoint -----------------------------------------------------------


def expert_layout_of(source, arch: GPTArchitecture, config: dict | None = None) -> tuple[str, list[str]]:
    """(expert layout, notes) of a checkpoint: each fused tensor's shape against [E, in, out] / [E, out, in];
    a tensor whose shape fits both (gate_up_proj when H == 2I, down_proj when H == I) follows the checkpoint's
    `transformers_version` (5 or later: `save_pretrained` orientation; earlier or none: released), said in a note.
    Raises ValueError when the tensors disagree."""
    t = arch.transformer
    hidden, ffn = t["hidden_size"], t["moe_ffn_hidden_size"]
    kinds = {"gate_up_proj": ((hidden, 2 * ffn), (2 * ffn, hidden)), "down_proj": ((ffn, hidden), (hidden, ffn))}
    verdicts: dict[str, str | None] = {}
    for kind, (in_out, out_in) in kinds.items():
        for name in sorted(n for n in source.keys() if n.endswith(f".mlp.experts.{kind}")):
            shape = tuple(source.shape(name))[1:]
            found = IN_OUT if shape == in_out != out_in else FUSED if shape == out_in != in_out else None
            if shape not in (in_out, out_in):
                raise ValueError(f"{name} ({source.where(name)}): shape {tuple(source.shape(name))} is neither "
                                 f"[E, {in_out[0]}, {in_out[1]}] nor [E, {out_in[0]}, {out_in[1]}]")
            if verdicts.setdefault(kind, found) != found:
                raise ValueError(f"{name} ({source.where(name)}) is stored in another orientation than other layers")
    if not verdicts:
        return IN_OUT, []
    notes = []
    version = str((config or {}).get("transformers_version") or "")
    by_version = FUSED if version and int(version.split(".")[0]) >= 5 else IN_OUT
    for kind, found in verdicts.items():
        if found is None:
            verdicts[kind] = by_version
            notes.append(
                f"qwen3_vl_moe: experts.{kind} is square per expert (hidden {hidden}, intermediate {ffn}), its shape "
                f"cannot tell the orientation; transformers_version {version or '(none)'} says "
                f"{'[E, out, in] (save_pretrained)' if by_version == FUSED else '[E, in, out] (released checkpoints)'}"
            )
    if len(set(verdicts.values())) > 1:
        raise ValueError(f"qwen3_vl_moe: expert tensors disagree on their orientation: {verdicts}" +
                         (f" ({notes[0]})" if notes else ""))
    for note in notes:
        log.warning(note)
    return next(iter(verdicts.values())), notes


# ---- weights: HF tensors <-> Megatron parameters -------------------------------------------------


def rules(arch: GPTArchitecture, expert_layout: str = IN_OUT) -> RuleSet:
    """The complete rule table (language model, vision tower) of a Qwen3-VL-MoE model built as `arch`.
    `expert_layout`: IN_OUT (released checkpoints, the default) or FUSED (transformers 5 save_pretrained)."""
    if expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"qwen3_vl_moe: expert layout {expert_layout!r} is not one of {EXPERT_LAYOUTS}")
    if expert_layout == FUSED:
        def experts_rules(m, h, experts, ffn, hidden):
            return routed_experts(m, h, experts, ffn, hidden, FUSED)
    else:
        experts_rules = _experts_in_out
    table, ignored = qwen3_moe.language_model_rules(arch, TEXT, experts_rules)
    table += arch.extra["vision"].rules(VISUAL)
    return RuleSet(table, ignored_hf=ignored)


def _experts_in_out(m: str, h: str, experts: int, ffn: int, hidden: int) -> list:
    """Released layout: expert e of gate_up_proj [E, H, 2I] (transposed, then gate / up halves) and of
    down_proj [E, I, H] (transposed) <-> `local_experts.e.linear_fc{1,2}.weight`."""
    table = []
    for e in range(experts):
        x = m + f"local_experts.{e}."
        table += [
            fused_gated_expert(x + "linear_fc1.weight", h + "gate_up_proj", (experts, hidden, 2 * ffn), e,
                               transpose=True),
            fused_expert(x + "linear_fc2.weight", h + "down_proj", (experts, ffn, hidden), e, transpose=True),
        ]
    return table


# transformers' default when a config omits `router_aux_loss_coef`.
DEFAULT_AUX_LOSS_COEF = 0.001


def _aux_loss_coef(config: dict) -> float:
    value = config.get("router_aux_loss_coef")
    return DEFAULT_AUX_LOSS_COEF if value is None else float(value)
