"""The model family contract: everything the import and export engines know about one HF model family.

Each family file (bridges/models/<name>.py) ends with one `Family` record; bridges/models/__init__.py lists
them by HF `model_type`. The engines (bridges/load.py, bridges/export/) and the callbacks use nothing else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch

from bridges.architecture import GPTArchitecture
from bridges.checkpoint.companions import COMPANION_FILES
from bridges.rules.expert_layouts import ExpertLayout, LayoutFound, detect_expert_layout
from bridges.rules.rule import RuleSet

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MTPNaming:
    """Where a family's checkpoints keep their multi-token-prediction (MTP) layers, and which config field
    counts them. MTP layer i is either `<after_decoder>layers.<num_hidden_layers + i>.*` (GLM-4.5, DeepSeek-V3)
    or one of the tensors under `under` (Qwen3.5: `mtp.*`)."""

    count_field: str  # config field holding the number of MTP layers
    in_text_config: bool = False  # the field (and num_hidden_layers) live in `text_config` (vision-language)
    after_decoder: str | None = None  # HF prefix of the decoder: "model." or "model.language_model."
    under: str | None = None  # prefix of every MTP tensor

    def text(self, config: dict[str, Any]) -> dict[str, Any]:
        return (config.get("text_config") or {}) if self.in_text_config else config

    def count(self, config: dict[str, Any]) -> int:
        """How many MTP layers `config` declares."""
        return int(self.text(config).get(self.count_field) or 0)

    def tensor_names(self, names: Iterable[str], config: dict[str, Any]) -> list[str]:
        """The HF tensors among `names` that belong to MTP layers, sorted."""
        if self.under is not None:
            return sorted(n for n in names if n.startswith(self.under))
        first = int(self.text(config).get("num_hidden_layers") or 0)
        prefix = f"{self.after_decoder}layers."
        out = []
        for name in names:
            layer = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
            if layer.isdigit() and int(layer) >= first:
                out.append(name)
        return sorted(out)


@dataclass(frozen=True)
class Family:
    """One HF model family: its config both ways, its rule table per on-disk expert layout, how to tell the
    layout of a checkpoint, its MTP tensor naming and the files that travel with its checkpoints."""

    model_type: str  # HF `model_type` of the configs this family reads and writes
    # HF config -> Megatron architecture; raises HFConfigError (one line, naming the field) for what Megatron
    # cannot express.
    architecture: Callable[[dict[str, Any]], GPTArchitecture]
    # Megatron architecture -> HF config (transformers 5 style) for an export; `source`: the import source's config
    # (fields Megatron does not model travel from it); `dtype`: the exported tensors' dtype.
    hf_config: Callable[[GPTArchitecture, dict[str, Any] | None, torch.dtype | None], dict[str, Any]]
    # The complete rule table of a model built as `arch` with experts stored in `layout` (global names).
    rules: Callable[[GPTArchitecture, ExpertLayout], RuleSet]
    # The on-disk expert layouts `rules` takes; the first is what an export without an import source writes.
    expert_layouts: tuple[ExpertLayout, ...] = (ExpertLayout.PER_EXPERT,)
    # (checkpoint, arch, its config, expert_layouts) -> the layout it holds, with notes for the user
    detect_layout: Callable[..., LayoutFound] = detect_expert_layout
    mtp: MTPNaming | None = None  # None: the family has no MTP layers
    companion_files: tuple[str, ...] = field(default=COMPANION_FILES)  # copied from the import source on export

    @property
    def default_layout(self) -> ExpertLayout:
        return self.expert_layouts[0]

    def ruleset(self, arch: GPTArchitecture, layout: ExpertLayout | str | None = None) -> RuleSet:
        """The rule table for `arch` in `layout` (the default layout when None); refuses a layout it does not read."""
        chosen = self.default_layout if layout is None else ExpertLayout(layout)
        if chosen not in self.expert_layouts:
            raise ValueError(f"{self.model_type}: expert layout {chosen} is not one of "
                             f"{', '.join(self.expert_layouts)}")
        return self.rules(arch, chosen)

    def detect(self, source, arch: GPTArchitecture, config: dict[str, Any] | None = None) -> LayoutFound:
        """The expert layout of the checkpoint `source` (an HFSource); raises ValueError naming the family and the
        tensor when it is none this family reads."""
        try:
            found = self.detect_layout(source, arch, config, self.expert_layouts)
        except ValueError as e:
            raise ValueError(f"{self.model_type}: {e}") from None
        if found.layout not in self.expert_layouts:
            raise ValueError(f"{self.model_type}: the checkpoint stores its experts {found.layout}, this family reads "
                             f"{', '.join(self.expert_layouts)}")
        notes = tuple(f"{self.model_type}: {note}" for note in found.notes)
        for note in notes:
            log.warning(note)
        return LayoutFound(found.layout, notes)

    def mtp_layers(self, config: dict[str, Any]) -> int:
        """The number of MTP layers an HF config of this family declares (0 for a family without MTP)."""
        return self.mtp.count(config) if self.mtp else 0

    def mtp_tensor_names(self, names: Iterable[str], config: dict[str, Any]) -> list[str]:
        """The MTP layers' tensors among a checkpoint's `names` (what an MTP passthrough carries)."""
        return self.mtp.tensor_names(names, config) if self.mtp else []

