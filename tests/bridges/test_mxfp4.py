"""MXFP4 blocks / scales read as transformers dequantizes them, region by region, from memory or from files."""

import pytest
import torch
from safetensors.torch import save_file

from bridges.checkpoint import mxfp4
from bridges.checkpoint.pieces import full_region
from bridges.checkpoint.safetensors_io import SafetensorsCheckpoint
from bridges.checkpoint.sources import DictSource

gen = torch.Generator().manual_seed(3)
E, R, G = 3, 10, 4  # experts, rows (out features), blocks of 32 along the input: C = 128


def random_pair(experts=E, rows=R, groups=G):
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=gen, dtype=torch.int64).to(torch.uint8)
    scales = torch.randint(127 - 12, 127 + 4, (experts, rows, groups), generator=gen).to(torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantized_tensor_equals_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_pair()
    source = mxfp4.dequantized(DictSource({"w_blocks": blocks, "w_scales": scales, "b": torch.zeros(2)}), dtype)
    assert source.keys() == ["b", "w"] and source.shape("w") == (E, G * 32, R) and source.dtype("w") == dtype
    expected = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, C, R]
    assert torch.equal(source.read("w"), expected)


REGIONS = [
    (slice(1, 2, 1), slice(0, 128, 1), slice(0, R, 1)),  # one expert, as an EP rank reads it
    (slice(0, 3, 2), slice(5, 100, 3), slice(1, R, 2)),  # strided, not block-aligned
    (slice(2, 3, 1), slice(31, 33, 1), slice(4, 5, 1)),  # across one block boundary
]


@pytest.mark.parametrize("region", REGIONS)
def test_regions_read_from_a_file_match_the_whole_tensor(tmp_path, region):
    blocks, scales = random_pair()
    save_file({"x.gate_up_proj_blocks": blocks, "x.gate_up_proj_scales": scales, "x.bias": torch.ones(3)},
              str(tmp_path / "model.safetensors"))
    files = SafetensorsCheckpoint(str(tmp_path))
    uint8_region = (region[0], region[2], slice(1, 3, 1), slice(0, 16, 3))
    assert torch.equal(files.read("x.gate_up_proj_blocks", uint8_region), blocks[uint8_region])
    source = mxfp4.dequantized(files)
    assert source.dtype("x.gate_up_proj") == torch.float32  # the other tensors' dtype
    assert source.where("x.gate_up_proj") == files.where("x.gate_up_proj_blocks")
    whole = source.read("x.gate_up_proj")
    assert torch.equal(whole, source.read("x.gate_up_proj", full_region(whole.shape)))
    assert torch.equal(source.read("x.gate_up_proj", region), whole[region])


def test_e2m1_codes_and_e8m0_scales():
    # byte 0x21: even element code 1 (0.5), odd element code 2 (1.0); byte 0xF8: -0.0, -6.0; scale 2^(130-127)
    blocks = torch.tensor([0x21, 0xF8] + [0] * 14, dtype=torch.uint8).reshape(1, 16)
    values = mxfp4.dequantize_rows(blocks, torch.tensor([130], dtype=torch.uint8), torch.float32)
    assert values[:4].tolist() == [4.0, 8.0, -0.0, -48.0] and not values[4:].any()


def test_a_checkpoint_without_pairs_is_returned_unchanged():
    source = DictSource({"w_blocks": torch.zeros(1, dtype=torch.uint8), "w": torch.zeros(2)})
    assert mxfp4.dequantized(source) is source


@pytest.mark.parametrize(
    "blocks, scales, message",
    [
        (torch.zeros(E, R, G, 16, dtype=torch.uint8), torch.zeros(E, R, G + 1, dtype=torch.uint8), "expected blocks"),
        (torch.zeros(E, R, G, 8, dtype=torch.uint8), torch.zeros(E, R, G, dtype=torch.uint8), "expected blocks"),
        (torch.zeros(E, R, G, 16), torch.zeros(E, R, G, dtype=torch.uint8), "uint8"),
    ],
)
def test_malformed_pairs_are_refused_with_the_tensor_name(blocks, scales, message):
    with pytest.raises(mxfp4.MXFP4Error, match=message) as info:
        mxfp4.dequantized(DictSource({"m.down_proj_blocks": blocks, "m.down_proj_scales": scales}))
    assert "m.down_proj_" in str(info.value)
