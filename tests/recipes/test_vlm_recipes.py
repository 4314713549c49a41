"""`python train.py recipe=qwen3_vl_moe` / `recipe=glm45v` as a user runs them: the bundled tiny models train on
image + text samples under EP2 and export every step; the exports load in transformers with no missing or
unexpected keys, and the vision tower's weights change from export to export (images reach the loss)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.train_runs import train

MODEL_CLASSES = {"qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration", "glm45v": "Glm4vMoeForConditionalGeneration"}


@pytest.mark.parametrize("recipe", sorted(MODEL_CLASSES))
def test_recipe_trains_on_images_and_exports_every_step(tmp_path, recipe):
    import transformers

    done = train(tmp_path, f"recipe={recipe}", "trainer.max_steps=2", "hf_export.every_n_train_steps=1",
                 "trainer.val_check_interval=2", "data.seq_length=32")
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.load(open(tmp_path / "run" / "metrics.json"))
    assert metrics["global_step"] == 2 and "val/lm_loss" in metrics
    exports = tmp_path / "run" / "hf"
    assert sorted(os.listdir(exports)) == ["latest", "step_1", "step_2"]
    step1, step2 = (load_file(str(exports / f"step_{n}" / "model.safetensors")) for n in (1, 2))
    vision = [name for name in step1 if name.startswith("model.visual.")]
    assert vision and any(not torch.equal(step1[n], step2[n]) for n in vision), "the vision tower was not trained"
    model, info = getattr(transformers, MODEL_CLASSES[recipe]).from_pretrained(
        str(exports / "step_2"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


# A processor as an HF model directory spells it (file -> contents); the export must carry each file unchanged.
PROCESSOR_FILES = {
    "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4,
                                 "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 64, "max_pixels": 4096},
    "video_preprocessor_config.json": {"video_processor_type": "Qwen3VLVideoProcessor", "patch_size": 4,
                                       "temporal_patch_size": 2, "merge_size": 2},
    "processor_config.json": {"processor_class": "Qwen3VLProcessor"},
}


def test_export_carries_the_import_sources_processor_files(tmp_path):
    from transformers import AutoConfig

    from tests.bridges.vlm_tiny import make_checkpoint

    source = tmp_path / "source"
    make_checkpoint(str(source), "qwen3_vl_moe", "fused")
    for name, content in PROCESSOR_FILES.items():
        (source / name).write_text(json.dumps(content, indent=2))
    (source / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    done = train(tmp_path, "recipe=qwen3_vl_moe", f"hf_import.path={source}", "trainer.max_steps=1",
                 "trainer.limit_val_batches=0", "data.seq_length=32")
    assert done.returncode == 0, done.stderr[-3000:]
    export = tmp_path / "run" / "hf" / "step_1"
    for name in [*PROCESSOR_FILES, "chat_template.jinja"]:
        assert (export / name).read_bytes() == (source / name).read_bytes(), name
    assert AutoConfig.from_pretrained(str(export)).get_text_config().rope_parameters["mrope_section"] == [4, 2, 2]
    # The image processor needs Pillow (installed with tensorboard), the video processor torchvision: with
    # them, the export's processors open as the source's do.
    pytest.importorskip("PIL")
    from transformers import AutoImageProcessor

    image = AutoImageProcessor.from_pretrained(str(export))
    assert image.to_dict() == AutoImageProcessor.from_pretrained(str(source)).to_dict() and image.patch_size == 4
    pytest.importorskip("torchvision")
    from transformers import AutoVideoProcessor

    assert AutoVideoProcessor.from_pretrained(str(export)).to_dict() == \
        AutoVideoProcessor.from_pretrained(str(source)).to_dict()
