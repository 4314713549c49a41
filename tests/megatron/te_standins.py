"""Megatron-Core's real Transformer Engine layer specs, built without TE kernels.

`use_te_layer_specs()` patches Megatron's TE spec provider (and the names gpt_layer_specs / MTP take from
it) so that every TE module class of the spec is replaced by a stand-in that declares the parameters
the TE module declares, in plain torch on this device. The spec itself (which modules, where the norms
fuse into the following linear layer, TEGroupedMLP for experts) is Megatron-Core's own code. Parameter
names the stand-ins cannot take from TE are read from Megatron-Core where it states them:
- the fused norm's prefix from the local spec's `sharded_state_dict_keys_map` (local norm -> TE name);
- per-GEMM names `weight{i}` / `bias{i}` as Megatron's TEGroupedLinear state-dict code spells them.
Only for building and converting weights: the stand-ins have no forward.
"""

from __future__ import annotations

import inspect
import re

import torch


def fused_norm_prefix() -> str:
    """`layer_norm_`: what Megatron-Core's local spec maps `input_layernorm.` to under TE."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    prefix = keys["input_layernorm."].rsplit(".", 1)[1]
    assert keys["pre_mlp_layernorm."].endswith("." + prefix), keys
    return prefix


def grouped_gemm_names() -> tuple[str, str]:
    """('weight{}', 'bias{}'): TEGroupedLinear's per-GEMM parameter names, from Megatron-Core's source."""
    from megatron.core.extensions import transformer_engine

    source = inspect.getsource(transformer_engine.TEGroupedLinear) if transformer_engine.TEGroupedLinear else \
        inspect.getsource(transformer_engine)
    names = set(re.findall(r'full_state_dict\[f"(weight|bias)\{gemm_idx\}"\]', source))
    assert names == {"weight", "bias"}, names
    return "weight{}", "bias{}"


def _standins():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.utils import get_pg_size

    norm_prefix = fused_norm_prefix()
    weight_name, bias_name = grouped_gemm_names()

    class StandInLayerNormColumnParallelLinear(ColumnParallelLinear):
        """TE LayerNormLinear: the preceding norm's weight lives in the linear layer."""

        def __init__(self, input_size, output_size, *, config, init_method, gather_output, bias, skip_bias_add,
                     is_expert, skip_weight_param_allocation=False, tp_comm_buffer_name=None, tp_group=None, stride=1):
            super().__init__(input_size, output_size, config=config, init_method=init_method, bias=bias,
                             gather_output=gather_output, skip_bias_add=skip_bias_add, is_expert=is_expert,
                             skip_weight_param_allocation=skip_weight_param_allocation, tp_group=tp_group,
                             stride=stride)
            self.register_parameter(norm_prefix + "weight", torch.nn.Parameter(torch.ones(input_size)))
            if config.normalization == "LayerNorm":
                self.register_parameter(norm_prefix + "bias", torch.nn.Parameter(torch.zeros(input_size)))

    class StandInGroupedLinear(torch.nn.Module):
        """TE GroupedLinear: one weight (and bias) per local expert, split over expert-TP."""

        parallel = None  # "column" or "row"

        def __init__(self, num_gemms, input_size, output_size, *, config, init_method, bias, skip_bias_add,
                     is_expert, tp_comm_buffer_name=None, pg_collection=None, **_):
            super().__init__()
            etp = get_pg_size(pg_collection.expt_tp) if pg_collection is not None else 1
            out_local = output_size // etp if self.parallel == "column" else output_size
            in_local = input_size // etp if self.parallel == "row" else input_size
            for i in range(num_gemms):
                self.register_parameter(weight_name.format(i), torch.nn.Parameter(torch.empty(out_local, in_local)))
                if bias:
                    self.register_parameter(bias_name.format(i), torch.nn.Parameter(torch.zeros(out_local)))

    class StandInColumnParallelGroupedLinear(StandInGroupedLinear):
        parallel = "column"

    class StandInRowParallelGroupedLinear(StandInGroupedLinear):
        parallel = "row"

    return {
        "TELayerNormColumnParallelLinear": StandInLayerNormColumnParallelLinear,
        "TEColumnParallelLinear": ColumnParallelLinear,
        "TERowParallelLinear": RowParallelLinear,
        "TELinear": ColumnParallelLinear,
        "TEDotProductAttention": DotProductAttention,
        "TENorm": WrappedTorchNorm,  # TE's RMSNorm / LayerNorm: `weight` (and `bias`)
        "TEColumnParallelGroupedLinear": StandInColumnParallelGroupedLinear,
        "TERowParallelGroupedLinear": StandInRowParallelGroupedLinear,
    }


def use_te_layer_specs() -> None:
    """In this process: Megatron-Core's TE specs with stand-in TE modules; our build picks the TE specs."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs, moe_module_specs
    from megatron.core.transformer import multi_token_prediction

    from bridges.megatron import no_te

    standins = _standins()
    for name, cls in standins.items():
        setattr(provider, name, cls)
    provider.is_te_min_version = lambda *args, **kwargs: True
    gpt_layer_specs.TENorm = standins["TENorm"]
    for module in (gpt_layer_specs, moe_module_specs, multi_token_prediction):
        module.TESpecProvider = provider.TESpecProvider
    no_te.use_te_layer_specs = lambda on_gpu: True
    no_te.enable()  # the stand-in norms are the local torch norms
