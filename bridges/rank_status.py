"""Agree on failure across ranks: every rank reports its status, and all raise together if any failed.

Call at the same point on every rank of the group; nothing else may decide whether it is reached.
Works without torch.distributed (a single process) too.
"""

from __future__ import annotations

import torch.distributed as dist


class RankFailure(RuntimeError):
    """One or more ranks failed a collective step; the message names each failing rank and its reason."""


def group_rank_and_size(group=None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


def exchange(payload, error: BaseException | None, what: str, group=None) -> list:
    """All-gather `payload` from every rank; if any rank passed an error, every rank raises RankFailure."""
    rank, world = group_rank_and_size(group)
    mine = (global_rank(group, rank) if world > 1 else 0, _describe(error), payload)
    gathered = [mine] if world == 1 else [None] * world
    if world > 1:
        dist.all_gather_object(gathered, mine, group=group)
    failed = [(r, reason) for r, reason, _ in gathered if reason is not None]
    if failed:
        reasons = "; ".join(f"rank {r}: {reason}" for r, reason in failed)  # one line: an `error:` line
        raise RankFailure(f"{what} failed on {len(failed)} of {world} ranks: {reasons}") from error
    return [p for _, _, p in gathered]


def agree(error: BaseException | None, what: str, group=None) -> None:
    """A status-only `exchange`: a barrier that also carries every rank's failure to all ranks."""
    exchange(None, error, what, group)


def _describe(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {error}"


def first_failure(error: BaseException | None, group=None) -> tuple[int, str] | None:
    """Collective: None when no rank failed; else (rank, message) of this rank's failure if it failed,
    or of the first failing rank's. Lets every rank raise one line of its own type."""
    rank, world = group_rank_and_size(group)
    reasons = exchange(None if error is None else str(error), None, "", group)
    if error is not None:
        return global_rank(group, rank) if world > 1 else 0, str(error)
    failed = [(global_rank(group, r) if world > 1 else 0, m) for r, m in enumerate(reasons) if m is not None]
    return failed[0] if failed else None
