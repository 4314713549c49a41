"""Megatron forward for parity checks: the main model's logits, full vocabulary, the same on every rank.

Runs the pipeline stages one after another (hidden states go stage to stage by send/recv), gathers
the vocab-parallel logits over TP and broadcasts them from the last stage. Not a training schedule.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from bridges.rules.local_params import unwrap
from bridges.megatron.build import causal_attention_mask


def main_logits(model, input_ids: torch.Tensor, vocab_size: int, **inputs) -> torch.Tensor:
    """[batch, seq, vocab_size] logits of the main model (any MTP block runs but is not in them).
    `inputs`: further model inputs (a vision-language model's `pixel_values`, `image_grid_thw`)."""
    from megatron.core import parallel_state as ps

    model = unwrap(model)
    config = model.config
    device = next(model.parameters()).device  # the model's device (a GPU run: the current CUDA device)
    input_ids = input_ids.to(device)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    batch, seq = input_ids.shape
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
    tp = ps.get_tensor_model_parallel_world_size()
    if not first:
        local_seq = seq // tp if config.sequence_parallel else seq
        hidden = torch.empty(local_seq, batch, config.hidden_size, dtype=config.params_dtype, device=device)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    captured: list[torch.Tensor] = []
    # A copy: the loss computed after the output layer (MTP path) works on the logits in place.
    hook = model.output_layer.register_forward_hook(lambda m, i, o: captured.append(o[0].clone())) if last else None
    # Megatron-Core 0.16 runs the MTP block only with labels; the main logits are the output layer's last call.
    labels = input_ids if getattr(model, "mtp_process", False) and last else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids, position_ids, causal_attention_mask(seq, device=device), labels=labels, **inputs)
    finally:
        model.train(was_training)
        if hook is not None:
            hook.remove()
    if not last:
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    logits = torch.empty(batch, seq, vocab_size, dtype=torch.float32, device=device)
    if last:
        local = captured[-1].float()  # [seq, batch, vocab / tp]
        shards = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(shards, dim=-1)[..., :vocab_size].transpose(0, 1).contiguous()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        last_rank, group = ps.get_pipeline_model_parallel_last_rank(), ps.get_pipeline_model_parallel_group()
        dist.broadcast(logits, src=last_rank, group=group)
    return logits.cpu()
