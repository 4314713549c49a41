"""Refusals a user can act on (a bad checkpoint, an unreadable file, a failed rank): entry points print one
`error: ...` line for them, without a traceback; `MOE_BRIDGE_DEBUG=1` shows the traceback instead."""

from __future__ import annotations

import os

DEBUG_VARIABLE = "MOE_BRIDGE_DEBUG"


def debug() -> bool:
    return os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")


def user_errors() -> tuple[type[BaseException], ...]:
    from bridges.export.directory import ExportDirError
    from bridges.checkpoint.files import CheckpointFileError
    from bridges.checkpoint.hf_config import HFConfigError
    from bridges.load import CheckpointMismatch
    from bridges.megatron.layout import LayoutError
    from bridges.checkpoint.mxfp4 import MXFP4Error
    from bridges.rank_status import RankFailure
    from bridges.checkpoint.safetensors_format import SafetensorsFormatError
    from bridges.checkpoint.safetensors_io import CheckpointError

    return (ExportDirError, CheckpointFileError, HFConfigError, CheckpointMismatch, LayoutError, MXFP4Error, RankFailure,
            SafetensorsFormatError, CheckpointError)
