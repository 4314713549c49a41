"""Build a Megatron-Core GPT model (MoE, MTP, multi-latent attention) for this rank from an architecture and a
parallel layout.

Used by training (recipes/) and by offline conversion checks (bridges.verify). The run's device was
decided when the parallel state was initialised (`cpu_runtime.active()`); nothing here probes CUDA. Knows nothing of
Hugging Face: model families translate their configs into a `GPTArchitecture` (bridges/models/).
"""

from __future__ import annotations

from typing import Any

import torch

from bridges.architecture import GPTArchitecture, padded_vocab_size
from bridges.megatron import cpu_runtime, no_te
from bridges.megatron.knobs import ModelKnobs
from bridges.megatron.layout import ParallelLayout


def transformer_config(
    arch: GPTArchitecture,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    mtp_loss_scaling_factor: float = 0.1,
    overrides: dict[str, Any] | None = None,
    knobs: ModelKnobs | None = None,
):
    from megatron.core.transformer import TransformerConfig

    on_gpu = not cpu_runtime.active()  # the run's accelerator, decided when the parallel state was set up

    kwargs = dict(arch.transformer)
    kwargs.update(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.expert_tp,
        # Megatron requires sequence parallelism for MoE with TP > 1.
        sequence_parallel=layout.tp > 1,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=cpu_runtime.active(),
        num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers,
        mtp_num_layers=arch.mtp_num_layers or None,
        mtp_loss_scaling_factor=mtp_loss_scaling_factor,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update((knobs or ModelKnobs()).megatron_fields(on_gpu, no_te.use_te_layer_specs(on_gpu)))
    if kwargs.get("num_moe_experts"):
        kwargs.setdefault("moe_router_dtype", "fp32")
    if arch.mrope is not None:
        kwargs.update(arch.mrope.megatron_fields())
    kwargs.update(overrides or {})
    kwargs = cpu_runtime.adapt_config(kwargs)
    if kwargs.get("multi_latent_attention"):
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        return MLATransformerConfig(**{**kwargs, **_mla_rotary_fields(arch)})
    if arch.yarn is not None:
        from bridges.megatron.yarn_config import YarnTransformerConfig

        return YarnTransformerConfig(**kwargs, **arch.yarn.megatron_fields())
    return TransformerConfig(**kwargs)


def _mla_rotary_fields(arch: GPTArchitecture) -> dict[str, Any]:
    """Multi-latent attention applies its rotary embedding itself, configured by these MLATransformerConfig
    fields (the GPT model's own rotary embedding is not built)."""
    fields = dict(rotary_base=arch.rotary_base, rotary_percent=arch.rotary_percent, rope_type="rope")
    y = arch.yarn
    if y is not None:
        both = bool(y.mscale and y.mscale_all_dim)
        fields.update(
            rope_type="yarn",
            rotary_scaling_factor=y.factor,
            original_max_position_embeddings=y.original_max_position_embeddings,
            beta_fast=y.beta_fast,
            beta_slow=y.beta_slow,
            # attention factor mscale(f, mscale) / mscale(f, all_dim) when both are set, else mscale(f, 1);
            # the softmax scale takes mscale(f, all_dim)^2 (1 when unset)
            mscale=y.mscale if both else 1.0,
            mscale_all_dim=y.mscale_all_dim or 0.0,
        )
    return fields


def build_gpt_model(
    arch: GPTArchitecture,
    layout: ParallelLayout,
    params_dtype: torch.dtype = torch.float32,
    mtp_loss_scaling_factor: float = 0.1,
    overrides: dict[str, Any] | None = None,
    model_class=None,
    knobs: ModelKnobs | None = None,
):
    """The GPTModel for this rank's pipeline stage (parallel state must be initialised).
    `model_class`: a GPTModel subclass to build instead (e.g. bridges.megatron.vlm.VisionLanguageModel)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    use_te = no_te.use_te_layer_specs(not cpu_runtime.active())
    if not use_te:
        no_te.enable()
    config = transformer_config(arch, layout, params_dtype, mtp_loss_scaling_factor, overrides, knobs)
    if config.experimental_attention_variant == "gated_delta_net":
        block_spec = gated_delta_net_block_spec(config, use_te)
    else:
        block_spec = get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization=config.normalization
        )
    if config.multi_latent_attention and not use_te:
        no_te.local_mla_core_attention(block_spec)
    mtp_spec = None
    if arch.mtp_num_layers:
        mtp_spec = get_gpt_mtp_block_spec(config, block_spec, use_transformer_engine=use_te)
    model = (model_class or GPTModel)(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=padded_vocab_size(arch.vocab_size, layout.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        # multi-latent attention applies its own rotary embedding ("rope": the GPT model builds none for it)
        position_embedding_type="mrope" if arch.mrope else "yarn" if arch.yarn and not config.multi_latent_attention
        else "rope",
        rotary_percent=arch.rotary_percent,
        rotary_base=int(arch.rotary_base) if float(arch.rotary_base).is_integer() else arch.rotary_base,
        mtp_block_spec=mtp_spec,
    )
    _params_in_dtype(model, params_dtype)
    _mark_softmax_offsets_tensor_parallel(model)
    _skip_expert_reductions_over_one_rank(model)
    _mask_vocab_padding(model, arch.vocab_size, layout.tp)
    if arch.mrope is not None and arch.mrope.interleaved:
        from bridges.megatron.mrope import InterleavedMultimodalRotaryEmbedding

        model.rotary_pos_emb = InterleavedMultimodalRotaryEmbedding.like(model.rotary_pos_emb)
    return model


def gated_delta_net_block_spec(config, use_te: bool):
    """This pipeline stage's decoder block spec of a hybrid model (Qwen3.5): the GPT layer specs, with Megatron-Core's
    GatedDeltaNet as the attention of the layers `config.linear_attention_freq` marks 1. The input norm stays a
    separate module (not fused into the in-projection), so parameter names are the same with and without
    Transformer Engine; the GatedDeltaNet's own output norm is a plain RMSNorm even with zero-centred norms."""
    import copy

    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_linear_attention_pattern
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    if use_te:
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

        backend = TESpecProvider()
    else:
        backend = LocalSpecProvider()
    norm = backend.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False)

    class PlainNorm:
        """The backend's norm without zero-centred gamma (Gated DeltaNet's gated output norm)."""

        def __new__(cls, config, hidden_size, eps=1e-5):
            plain = copy.copy(config)
            plain.layernorm_zero_centered_gamma = False
            return norm(config=plain, hidden_size=hidden_size, eps=eps)

    gdn = ModuleSpec(module=GatedDeltaNet, submodules=GatedDeltaNetSubmodules(
        in_proj=backend.column_parallel_linear(), out_norm=PlainNorm, out_proj=backend.row_parallel_linear()))
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te, normalization=config.normalization)
    offset = get_transformer_layer_offset(config)
    pattern = get_linear_attention_pattern(config)
    specs = []
    for index, spec in enumerate(block.layer_specs):
        if pattern[offset + index]:
            spec = copy.deepcopy(spec)
            spec.submodules.self_attention = gdn
            spec.submodules.input_layernorm = norm
        specs.append(spec)
    block.layer_specs = specs
    return block


def _mask_vocab_padding(model, vocab_size: int, tp: int) -> None:
    """Give the padded vocabulary rows (TP needs vocab % tp == 0) a logit of -inf in effect.

    Megatron's cross-entropy takes the softmax over every row it holds; padded rows at logit 0 would
    add to the denominator, so the loss (and its gradients) would differ from the unpadded model.
    """
    from megatron.core import parallel_state

    padded = padded_vocab_size(vocab_size, tp)
    output_layer = getattr(model, "output_layer", None)
    if padded == vocab_size or output_layer is None:
        return
    local = padded // tp
    first_padded = vocab_size - parallel_state.get_tensor_model_parallel_rank() * local
    if first_padded >= local:
        return  # this TP rank holds no padding

    def hook(module, args, output):
        logits, bias = output
        mask = torch.zeros(local, dtype=torch.bool, device=logits.device)
        mask[max(first_padded, 0):] = True
        return logits.masked_fill(mask, torch.finfo(logits.dtype).min), bias

    output_layer.register_forward_hook(hook)


def _params_in_dtype(model, params_dtype: torch.dtype) -> None:
    """Every parameter in the training dtype, as Megatron's Float16Module makes them (torch's norm, used
    without Transformer Engine, is built in fp32). Buffers keep their dtype (the router's fp32 expert bias)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != params_dtype:
            param.data = param.data.to(params_dtype)


def _mark_softmax_offsets_tensor_parallel(model) -> None:
    """Megatron-Core 0.16 splits the learnable softmax offset (attention sinks) over TP ranks by head but
    does not mark it so; marked, each rank's slice counts once in the global gradient norm."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    for name, param in model.named_parameters():
        if name.endswith("core_attention.softmax_offset"):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)


def _skip_expert_reductions_over_one_rank(model) -> None:
    """Megatron-Core 0.16's MLP adds an expert's fc2 bias in place (`output += bias * probs`). With EP 1 and
    expert-TP 1 the expert's RowParallelLinear still 'reduces' over its group of one, through an autograd
    Function that returns its input, and autograd refuses the in-place add under grad. That reduction is
    the identity: skip it, as Megatron itself does for experts under EP or expert-TP (explicit_expert_comm)."""
    from megatron.core.tensor_parallel import RowParallelLinear

    for module in model.modules():
        if (isinstance(module, RowParallelLinear) and module.is_expert and module.bias is not None
                and module.skip_bias_add and not module.explicit_expert_comm and module.tp_group.size() == 1):
            module.explicit_expert_comm = True


def causal_attention_mask(seq_length: int, device=None) -> torch.Tensor:
    """Megatron's boolean mask (True = masked); the local attention needs it explicitly."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)
