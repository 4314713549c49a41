"""Every op's inverse undoes its forward exactly, and view ops read the same values as their forward."""

import pytest
import torch

from bridges.rules import ops
from bridges.checkpoint.pieces import full_region
from bridges.rules.views import View

gen = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=gen)


def assert_all_equal(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.shape == y.shape and torch.equal(x, y)


CASES = [
    (ops.Rename(), [rand(7, 5)]),
    (ops.Transpose(), [rand(7, 5)]),
    (ops.Transpose(0, 2), [rand(3, 7, 5)]),
    (ops.QKVInterleave(heads_per_group=3, head_dim=5), [rand(2 * 3 * 5, 7), rand(2 * 5, 7), rand(2 * 5, 7)]),
    (ops.QKVInterleave(heads_per_group=1, head_dim=3), [rand(5 * 3), rand(5 * 3), rand(5 * 3)]),  # biases, MHA
    (ops.GateUpConcat(), [rand(9, 5), rand(9, 5)]),
    (ops.GateUpConcat(dim=1), [rand(5, 9), rand(5, 9)]),
    (ops.ExpertSlice(), [rand(7, 9, 5)]),
    (ops.GateUpHalves(), [rand(2 * 9, 5)]),
    (ops.GateUpHalves(dim=1), [rand(5, 2 * 9)]),
    (ops.GateUpInterleave(), [rand(2 * 9, 5)]),
    (ops.GateUpInterleave(dim=-1), [rand(3, 5, 2 * 9)]),
    (ops.Concat((4, 4, 6, 6, 2, 2)), [rand(n, 5) for n in (4, 4, 6, 6, 2, 2)]),  # a Gated DeltaNet in-projection
    (ops.Concat((4, 4, 6)), [rand(n, 1, 3) for n in (2, 2, 3)]),  # half of each part: a TP2 shard
    # 2 KV groups of 2 heads: (q, gate) per head, then k and v per group, heads of 3 rows
    (ops.GatedQKVInterleave(heads_per_group=2, head_dim=3), [rand(3, 7) for _ in range(2 * 4 + 2 + 2)]),
    (ops.Sections((4, 4, 6)), [rand(14, 5)]),
    (ops.Blocks(3), [rand(12, 5)]),
]


@pytest.mark.parametrize("op, xs", CASES, ids=lambda c: type(c).__name__ if not isinstance(c, list) else "")
def test_inverse_undoes_forward(op, xs):
    ys = op.forward(xs)
    assert_all_equal(op.inverse(ys), xs)
    assert_all_equal(op.forward(op.inverse(ys)), ys)


def test_qkv_groups_queries_with_their_kv_head():
    head_dim, groups, per_group = 2, 3, 2
    q = torch.arange(groups * per_group * head_dim).float().reshape(-1, 1)
    k, v = 100 + torch.arange(groups * head_dim).float().reshape(-1, 1), 200 + torch.arange(groups * head_dim).float().reshape(-1, 1)
    (qkv,) = ops.QKVInterleave(per_group, head_dim).forward([q, k, v])
    first_group = qkv[: (per_group + 2) * head_dim, 0].tolist()
    assert first_group == [0, 1, 2, 3, 100, 101, 200, 201]


def test_gated_qkv_puts_a_groups_queries_then_their_gates_then_k_and_v():
    head = lambda value: torch.full((1, 1), float(value))  # noqa: E731  one-row heads
    q_and_gates = [head(v) for i in range(4) for v in (10 + i, 20 + i)]  # q_0, g_0, q_1, g_1, ...
    (qkv,) = ops.GatedQKVInterleave(heads_per_group=2, head_dim=1).forward(
        q_and_gates + [head(30), head(31), head(40), head(41)])
    assert qkv[:, 0].tolist() == [10, 11, 20, 21, 30, 40, 12, 13, 22, 23, 31, 41]


def test_gate_up_interleave_even_is_gate():
    x = torch.arange(8).float().reshape(8, 1)
    gate, up = ops.GateUpInterleave().forward([x])
    assert gate[:, 0].tolist() == [0, 2, 4, 6] and up[:, 0].tolist() == [1, 3, 5, 7]


def test_expert_stack_is_inverse_of_slice():
    experts = [rand(3, 4) for _ in range(5)]
    (fused,) = ops.ExpertSlice().inverse(experts)
    assert fused.shape == (5, 3, 4)
    assert_all_equal(ops.ExpertSlice().forward([fused]), experts)


VIEW_CASES = [
    ([ops.Transpose()], rand(7, 5), None),
    ([ops.ExpertSlice()], rand(6, 7, 5), 4),
    ([ops.ExpertSlice(), ops.Transpose()], rand(6, 5, 7), 2),
    ([ops.GateUpHalves()], rand(2 * 7, 5), None),
    ([ops.GateUpInterleave()], rand(2 * 7, 5), None),
    ([ops.ExpertSlice(), ops.Transpose(), ops.GateUpInterleave()], rand(6, 5, 2 * 7), 5),
    ([ops.ExpertSlice(), ops.GateUpHalves()], rand(6, 2 * 7, 5), 0),
    ([ops.Sections((4, 4, 6))], rand(14, 1, 3), None),
    ([ops.Blocks(3)], rand(12, 5), None),
]


@pytest.mark.parametrize("chain, x, expert", VIEW_CASES)
def test_views_read_what_forward_computes(chain, x, expert):
    expected, views = [x], [View.whole(tuple(x.shape))]
    for op in chain:
        outputs = [y for t in expected for y in op.forward([t])]
        expected = [outputs[expert]] if isinstance(op, ops.ExpertSlice) else outputs
        views = [w for v in views for w in op.views(v, expert)]
    for view, want in zip(views, expected, strict=True):
        region = view.region(full_region(view.shape))
        assert torch.equal(view.to_part(x[region]), want)
        back = torch.zeros_like(x)
        back[region] = view.to_hf(want)
        assert torch.equal(back[region], x[region])
