"""GPU smoke checks, run in order, one PASS/FAIL line each (`make gpu-smoke`; `ACCEL=cpu` for a dry run).

1. train 4 steps (bf16 on GPU) with an async HF export every 2 steps and a Lightning checkpoint;
2. resume that checkpoint for 2 more steps;
3. import the step-4 export, train 1 step at lr=1e-12 and export again: every tensor equals the source's
   (bit for bit, but for weights within ~lr of zero, which one Adam step can move by lr);
4. `python -m bridges.verify` under torchrun on the export: bit-exact round trip, logits vs transformers.
Processes: every GPU of the node (up to 8; experts spread over them), 2 on CPU. tests/gpu/test_gpu.py runs
the same checks under pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

LR = 1e-12  # the import check's learning rate
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Smoke:
    def __init__(self, work_dir: str, accel: str = "gpu"):
        import torch

        self.work, self.accel = work_dir, accel
        self.procs = min(torch.cuda.device_count(), 8) if accel == "gpu" else 2
        if self.procs < 1:
            raise RuntimeError("ACCEL=gpu but no CUDA device is visible")
        self.precision = "bf16" if accel == "gpu" else "fp32"
        self.run = os.path.join(work_dir, "run")

    def _cmd(self, cmd: list[str], timeout: float = 240) -> str:
        env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_DEVICE_MAX_CONNECTIONS": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        with open(os.path.join(self.work, "smoke.log"), "a") as f:
            f.write(f"$ {' '.join(cmd)}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}\n\n")
        if done.returncode != 0:
            lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
            raise AssertionError(f"exit {done.returncode}: {lines[-1] if lines else ''}")
        return done.stdout

    def _train(self, run_dir: str, *overrides: str) -> str:
        n = self.procs
        return self._cmd([
            sys.executable, "train.py", "recipe=glm45", f"hydra.run.dir={run_dir}", f"trainer.accelerator={self.accel}",
            f"trainer.devices={n}", f"parallel.ep={n}", f"data.global_batch_size={4 * n}",
            f"trainer.precision={self.precision}", "trainer.val_check_interval=null", "trainer.limit_val_batches=0",
            *overrides,
        ])

    def train(self) -> str:
        self._train(self.run, "trainer.max_steps=4", "hf_export.every_n_train_steps=2", "hf_export.async_write=true",
                    "trainer.enable_checkpointing=true",
                    "+callbacks.checkpoint._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                    f"+callbacks.checkpoint.dirpath={self.run}/checkpoints", "+callbacks.checkpoint.filename='step_{step}'",
                    "+callbacks.checkpoint.auto_insert_metric_name=false", "+callbacks.checkpoint.save_top_k=-1",
                    "+callbacks.checkpoint.every_n_train_steps=4")
        for path in ("hf/step_2/config.json", "hf/step_4/model.safetensors.index.json", "checkpoints/step_4.ckpt"):
            assert os.path.exists(os.path.join(self.run, path)), f"{path} missing"
        return "4 steps, exports step_2 and step_4, checkpoint step_4"

    def resume(self) -> str:
        out = self._train(os.path.join(self.work, "resumed"), "trainer.max_steps=6",
                          f"ckpt_path={self.run}/checkpoints/step_4.ckpt")
        assert os.path.isdir(os.path.join(self.work, "resumed", "hf", "step_6")), out[-500:]
        return "resumed at step 4, exported step 6"

    def import_export(self) -> str:
        from safetensors import safe_open

        source = os.path.join(self.run, "hf", "step_4")
        again = os.path.join(self.work, "again")
        self._train(again, f"hf_import.path={source}", "trainer.max_steps=5", f"optim.lr={LR}", f"optim.min_lr={LR}",
                    "optim.warmup_steps=0",
                    # GLM-4.5's router bias moves by its own update rate, not by the optimizer: held still.
                    "+model.overrides.moe_router_bias_update_rate=0")
        target = os.path.join(again, "hf", "step_5")
        tensors = _tensors(source, safe_open)
        exported = _tensors(target, safe_open)
        assert tensors.keys() == exported.keys(), sorted(set(tensors) ^ set(exported))[:5]
        # One Adam step moves a weight by about lr at most: only weights within ~lr of zero can change at all.
        moved = {n: (tensors[n].float() - exported[n].float()).abs().max().item() for n in tensors}
        wrong = {n: d for n, d in moved.items() if d > 2 * LR}
        assert not wrong, f"{len(wrong)} tensors differ by more than the step can move them, e.g. {list(wrong.items())[:3]}"
        same = sum(d == 0 for d in moved.values())
        elements = sum(t.numel() for t in tensors.values())
        changed = sum(int((tensors[n] != exported[n]).sum()) for n in tensors)
        assert changed <= elements // 100, f"{changed} of {elements} elements changed"
        return (f"{len(tensors)} tensors back: {same} bit-identical, the rest within {2 * LR:g} "
                f"({changed} of {elements} elements, all near zero)")

    def verify(self) -> str:
        n = self.procs
        out = self._cmd([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                         "-m", "bridges.verify", os.path.join(self.run, "hf", "step_4"), f"--ep={n}", "--atol=1e-3"])
        assert "verify: OK" in out, out[-2000:]
        return next(ln for ln in out.splitlines() if ln.startswith("logits vs transformers"))

    def checks(self):
        return [("train", self.train), ("resume", self.resume), ("import-export", self.import_export),
                ("verify", self.verify)]


def _tensors(directory: str, safe_open) -> dict:
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def main() -> int:
    accel = os.environ.get("ACCEL", "gpu")
    work = tempfile.mkdtemp(prefix="gpu-smoke-")
    smoke = Smoke(work, accel)
    print(f"gpu-smoke: ACCEL={accel}, {smoke.procs} processes, {smoke.precision}, work dir {work}", flush=True)
    failed = 0
    for name, check in smoke.checks():
        start = time.monotonic()
        try:
            detail = check()
            print(f"PASS {name} ({time.monotonic() - start:.0f}s): {detail}", flush=True)
        except Exception as e:  # noqa: BLE001 - every check reports
            failed += 1
            print(f"FAIL {name} ({time.monotonic() - start:.0f}s): {e}", flush=True)
    print(f"gpu-smoke: {'all passed' if not failed else f'{failed} failed'} (commands and output: {work}/smoke.log)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
