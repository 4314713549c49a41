"""Parallel layouts and data-parallel gradient agreement under real Lightning training (gloo, CPU).

Processes are started once per world size; each runs the layout checks and a short fit.
"""

import os

import pytest
import torch

from tests.launcher import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "conf", "model", "glm45_tiny")


def _layout_facts():
    from megatron.core import parallel_state as ps

    return {
        "tp": ps.get_tensor_model_parallel_world_size(),
        "tp_rank": ps.get_tensor_model_parallel_rank(),
        "ep": ps.get_expert_model_parallel_world_size(),
        "ep_rank": ps.get_expert_model_parallel_rank(),
        "etp": ps.get_expert_tensor_parallel_world_size(),
        "dp": ps.get_data_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(),
        "expert_dp": ps.get_expert_data_parallel_world_size(),
        "pp": ps.get_pipeline_model_parallel_world_size(),
    }


class _GradProbe:
    """After the first optimizer step: do data-parallel replicas hold identical weights? (The distributed
    optimizer reduce-scatters gradients, so each replica holds only its own shard of them, and all-gathers
    the updated weights.)"""

    def __init__(self):
        import lightning.pytorch as pl

        probe = self

        class Callback(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == 1:
                    probe.first_step = probe.compare(module.model)

        self.callback = Callback()
        self.first_step = None

    @staticmethod
    def compare(model):
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        checked, differing = 0, []
        for name, p in model.named_parameters():
            is_expert = not getattr(p, "allreduce", True)
            group = ps.get_expert_data_parallel_group() if is_expert else ps.get_data_parallel_group()
            if dist.get_world_size(group) == 1:
                continue
            for label, t in (("weight", p.data),):
                gathered = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
                dist.all_gather(gathered, t.contiguous(), group=group)
                if not all(torch.equal(gathered[0], g) for g in gathered[1:]):
                    gap = max(float((gathered[0] - g).abs().max()) for g in gathered[1:])
                    differing.append(f"{label} {name}: max diff {gap:.3g}")
            checked += 1
        return checked, differing


def _fit(tp, ep, steps=4):
    import lightning.pytorch as pl

    from bridges.megatron import cpu_runtime
    from recipes.data import TokenDataModule
    from recipes.module import MegatronGPTModule
    from recipes.strategy import MegatronStrategy

    cpu_runtime.enable()
    import torch.distributed as dist

    world = dist.get_world_size()
    module = MegatronGPTModule(TINY, mtp_enabled=True, micro_batch_size=2, optim={"lr": 3e-3, "warmup_steps": 1})
    data = TokenDataModule(kind="synthetic", seq_length=32, micro_batch_size=2, global_batch_size=8, num_samples=256)
    data.vocab_size = module.arch.vocab_size
    probe = _GradProbe()
    losses, layout = [], {}

    class Losses(pl.Callback):
        def on_train_start(self, trainer, module):
            layout.update(_layout_facts())  # the strategy tears parallel state down after fit

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/lm_loss"]))

    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=MegatronStrategy(tp=tp, ep=ep), max_steps=steps,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe.callback, Losses()],
    )
    trainer.fit(module, datamodule=data)
    local_experts = sorted(
        {n.split("local_experts.")[1].split(".")[0] for n, _ in module.model.named_parameters() if "local_experts" in n}
    )
    return {"layout": layout, "probe": probe.first_step, "losses": losses, "local_experts": len(local_experts)}


def _run_layouts(cases):
    return [_fit(tp, ep) for tp, ep in cases]


@pytest.fixture(scope="module")
def world2():
    # EP2 (dense weights replicated over DP2), TP2, and plain DP2, in the same two processes.
    return run_distributed(2, _run_layouts, [(1, 2), (2, 1), (1, 1)])


def test_world2_ep2_layout(world2):
    for rank, results in enumerate(world2):
        facts = results[0]["layout"]
        assert facts == {"tp": 1, "tp_rank": 0, "ep": 2, "ep_rank": rank, "etp": 1, "dp": 2, "dp_rank": rank,
                         "expert_dp": 1, "pp": 1}
        assert results[0]["local_experts"] == 4  # 8 experts over EP2


def test_world2_tp2_layout(world2):
    for rank, results in enumerate(world2):
        facts = results[1]["layout"]
        assert facts == {"tp": 2, "tp_rank": rank, "ep": 1, "ep_rank": 0, "etp": 2, "dp": 1, "dp_rank": 0,
                         "expert_dp": 1, "pp": 1}
        assert results[1]["local_experts"] == 8


@pytest.mark.parametrize("case", [0, 2], ids=["ep2", "dp2"])
def test_data_parallel_replicas_agree_after_a_step(world2, case):
    checked, differing = world2[0][case]["probe"]
    assert checked > 0, "no data-parallel replicated parameter was compared"
    assert differing == []


@pytest.mark.parametrize("case", [0, 1, 2], ids=["ep2", "tp2", "dp2"])
def test_loss_falls(world2, case):
    losses = world2[0][case]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.2, losses
    assert world2[1][case]["losses"] == losses  # every rank logs the same value


def test_world4_tp2_ep2_layout():
    results = run_distributed(4, _run_layouts, [(2, 2)])
    for rank, (result,) in enumerate(results):
        facts = result["layout"]
        assert (facts["tp"], facts["ep"], facts["etp"], facts["dp"], facts["expert_dp"]) == (2, 2, 2, 2, 1)
        assert facts["tp_rank"] == rank % 2  # TP groups are adjacent ranks
        assert result["local_experts"] == 4
        assert result["losses"][-1] < result["losses"][0]
        checked, differing = result["probe"]
        assert checked > 0 and differing == []
