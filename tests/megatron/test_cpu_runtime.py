"""Each CPU compatibility step for Megatron-Core is active once enabled (the run's device is the CPU), and
closes its gap."""

import pytest
import torch

from bridges.megatron import cpu_runtime


@pytest.fixture(scope="module", autouse=True)
def runtime():
    cpu_runtime.enable()
    cpu_runtime.enable()  # idempotent
    assert cpu_runtime.active()


def test_current_device_and_cuda_calls_stay_on_cpu():
    assert torch.cuda.current_device() == "cpu"
    t = torch.ones(2)
    assert t.cuda() is t
    torch.cuda.synchronize()  # no-op instead of "Torch not compiled with CUDA enabled"
    assert torch.zeros(3, device=torch.cuda.current_device()).device.type == "cpu"


def test_rng_tracker_streams_are_named_reproducible_and_isolated():
    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    tracker = mrandom.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_runtime.CpuRNGStatesTracker)
    tracker.add("model-parallel-rng", 123)
    tracker.add("expert-parallel-rng", 456)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # the default stream is untouched
    with tracker.fork():
        a_next = torch.rand(4)
    assert not torch.equal(a, a_next)  # a stream advances across forks
    with tracker.fork("expert-parallel-rng"):
        c = torch.rand(4)
    assert not torch.equal(a, c)
    fresh = cpu_runtime.CpuRNGStatesTracker()
    fresh.add("model-parallel-rng", 123)
    with fresh.fork():
        assert torch.equal(torch.rand(4), a)  # same seed, same stream
    with pytest.raises(Exception, match="already exists"):
        fresh.add("other", 123)
    with pytest.raises(Exception, match="not added"):
        with tracker.fork("no-such-stream"):
            pass


def test_pipeline_schedule_cuda_allocations_land_on_cpu():
    from megatron.core.pipeline_parallel import schedules

    assert schedules.torch.zeros([], dtype=torch.int, device="cuda").device.type == "cpu"
    assert schedules.torch.ones is torch.ones


def test_adapt_config_picks_cpu_implementations():
    out = cpu_runtime.adapt_config({"num_moe_experts": 4, "moe_token_dispatcher_type": "alltoall",
                                    "bias_activation_fusion": True})
    assert out["moe_token_dispatcher_type"] == "allgather"
    assert out["bias_activation_fusion"] is False and out["gradient_accumulation_fusion"] is False


@pytest.mark.parametrize("sq, skv, window", [(7, 7, (2, 0)), (3, 7, (2, 0)), (6, 6, (1, 1)), (5, 5, (0, 0))])
def test_sliding_window_mask_is_built_on_cpu_as_megatron_defines_it(sq, skv, window):
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    assert utils.get_sliding_window_causal_mask is fused_softmax.get_sliding_window_causal_mask
    mask = fused_softmax.get_sliding_window_causal_mask(sq, skv, window)
    assert mask.device.type == "cpu" and mask.dtype == torch.bool
    for i in range(sq):  # query i is key position i + skv - sq; True = masked
        pos = i + skv - sq
        expected = [not (pos - window[0] <= j <= pos + window[1]) for j in range(skv)]
        assert mask[i].tolist() == expected


def test_optimizer_cuda_allocations_and_type_checks_pass_on_cpu():
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    assert optimizer.torch.tensor([1.0], device="cuda").device.type == "cpu"
    assert clip_grads.torch.zeros(1, device="cuda").device.type == "cpu"
    grads = [torch.full((3,), 2.0), torch.full((1,), 2.0)]
    norm, _ = clip_grads.l2_norm_impl(0, None, [grads], False)
    assert norm.device.type == "cpu" and float(norm) == 4.0
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 3.0)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=6.0)  # asserts a cuda float grad
    assert torch.allclose(p.grad, torch.full((4,), 0.5), rtol=1e-5)
    assert p.type() == "torch.FloatTensor"  # the cuda names hold only inside the wrapped calls
    assert optimizer.clip_grad_by_total_norm_fp32 is clip_grads.clip_grad_by_total_norm_fp32
    assert getattr(distrib_optimizer.DistributedOptimizer.__init__, "__wrapped__", None) is not None
