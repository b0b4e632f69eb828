"""NVFP4 scales, packed bytes and round trips, checked by hand and against ModelOpt 0.47.0."""

import math

import pytest
import torch
from modelopt.torch.quantization.qtensor import NVFP4QTensor

from elastic_cli.formats import e2m1, nvfp4
from elastic_cli.formats.errors import FormatError

FP8_ONE = 0x38  # float8_e4m3fn bit pattern of 1.0
FP8_TWO = 0x40
FP8_MIN_SUBNORMAL = 0x01  # 2**-9
FP8_MAX = 0x7E  # 448


def fp8_bits(tensor: torch.Tensor) -> list:
    return tensor.view(torch.uint8).tolist()


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    noise = (reference - approximation).double().pow(2).sum()
    return 10 * math.log10(float(reference.double().pow(2).sum() / noise))


def gaussian_weight(rows: int, columns: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator)


def outlier_weight(seed: int) -> torch.Tensor:
    """Gaussian weight with large outliers, near-zero rows, tiny blocks and zero blocks."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(128, 512, generator=generator)

    outliers = torch.rand(128, 512, generator=generator) < 0.002
    weight[outliers] *= 1000.0
    weight[10:20] *= 1e-3  # blocks whose scale clamps at 2**-9
    weight[30, 0:64] *= 1e-6
    weight[40, 16:48] = 0.0  # two empty blocks
    weight[50] = 0.0  # an empty row
    return weight


def tie_weight(seed: int) -> tuple[torch.Tensor, float]:
    """Weight whose scaled elements fall exactly on E2M1 ties, with its global scale.

    With global scale 2**-8, a block whose amax is 6 * k (k a power of two <= 1) gets the
    exact block scale 256 * k, so each element divides to one of the tie values.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, blocks = 64, 16
    tie_values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 0.5, 3.0, 6.0])

    choice = torch.randint(0, len(tie_values), (rows, blocks, 16), generator=generator)
    elements = tie_values[choice]
    elements[..., 0] = 6.0  # fixes each block's amax at 6 * k
    signs = torch.randint(0, 2, (rows, blocks, 16), generator=generator) * 2 - 1
    exponents = torch.randint(-6, 1, (rows, blocks, 1), generator=generator)
    weight = elements * signs * torch.pow(2.0, exponents.float())
    return weight.reshape(rows, blocks * 16), 2.0**-8


def modelopt_quantize(weight: torch.Tensor, global_scale: torch.Tensor | float | None = None):
    """Return ModelOpt's (packed, block_scale, global_scale) for block size 16."""
    if global_scale is not None:
        global_scale = torch.as_tensor(global_scale, dtype=torch.float32)
    qtensor, block_scale, modelopt_global = NVFP4QTensor.quantize(
        weight, 16, weights_scaling_factor_2=global_scale
    )
    return qtensor._quantized_data, block_scale, modelopt_global


def test_global_scale_is_amax_over_2688():
    scale = nvfp4.global_scale(torch.tensor(2688.0))

    assert scale.dtype == torch.float32
    assert scale.shape == ()
    assert float(scale) == 1.0
    assert float(nvfp4.global_scale(672.0)) == 0.25


def test_global_scale_converts_amax_to_float32_first():
    amax = torch.tensor(3.140625, dtype=torch.bfloat16)

    scale = nvfp4.global_scale(amax)

    assert torch.equal(scale, torch.tensor(3.140625) / 2688.0)


def test_global_scale_zero_amax_is_one():
    scale = nvfp4.global_scale(torch.tensor(0.0))

    assert float(scale) == 1.0


@pytest.mark.parametrize("amax", [-1.0, float("nan"), float("inf")])
def test_global_scale_rejects_invalid_amax(amax):
    with pytest.raises(FormatError, match="finite value >= 0"):
        nvfp4.global_scale(amax)


def test_global_scale_rejects_tiny_amax():
    with pytest.raises(FormatError, match="too small for NVFP4"):
        nvfp4.global_scale(1e-36)


def test_global_scale_rejects_tensor_amax():
    with pytest.raises(FormatError, match="4 elements"):
        nvfp4.global_scale(torch.ones(4))


def test_block_scale_hand_computed():
    weight = torch.cat(
        [torch.full((1, 16), 6.0), torch.full((1, 16), -12.0), torch.full((1, 16), 3.0)], dim=1
    )

    scales = nvfp4.block_scale(weight, 1.0)

    assert scales.dtype == torch.float8_e4m3fn
    assert scales.shape == (1, 3)
    assert scales.float().tolist() == [[1.0, 2.0, 0.5]]


def test_block_scale_clamps_small_block_to_min():
    weight = torch.full((1, 16), 1e-4)

    scales = nvfp4.block_scale(weight, 1.0)

    assert fp8_bits(scales) == [[FP8_MIN_SUBNORMAL]], "1e-4 / 6 should clamp to 2**-9"


def test_block_scale_clamps_large_block_to_max():
    weight = torch.full((1, 16), 6.0)

    scales = nvfp4.block_scale(weight, 2.0**-10)

    assert fp8_bits(scales) == [[FP8_MAX]], "block scale 1024 should clamp to 448, not NaN"


def test_block_scale_empty_block_is_one():
    weight = torch.zeros(2, 32)
    weight[1, 16:] = 6.0

    scales = nvfp4.block_scale(weight, 1.0)

    assert fp8_bits(scales) == [[FP8_ONE, FP8_ONE], [FP8_ONE, FP8_ONE]]


def test_block_scale_underflow_is_one():
    smallest_subnormal = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    weight = torch.full((1, 16), smallest_subnormal)

    scales = nvfp4.block_scale(weight, 1.0)

    assert fp8_bits(scales) == [[FP8_ONE]], "a block scale that underflows to 0 becomes 1.0"


def test_quantize_hand_computed_bytes():
    magnitudes = [0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0]
    row = torch.tensor(magnitudes + [-m for m in magnitudes])
    weight = torch.cat([row, 2.0 * row]).reshape(1, 32)

    packed, scales = nvfp4.quantize(weight, 1.0)

    expected_bytes = [
        0b0010_0001,
        0b0100_0011,
        0b0110_0101,
        0b0000_0111,
        0b1010_1001,
        0b1100_1011,
        0b1110_1101,
        0b0000_1111,
    ]
    assert packed.dtype == torch.uint8
    assert packed.shape == (1, 16)
    assert packed.tolist() == [expected_bytes * 2]
    assert fp8_bits(scales) == [[FP8_ONE, FP8_TWO]]


def test_quantize_rounds_ties_to_even():
    weight = torch.tensor([[6.0, 2.5, -5.0, 0.25, 1.75, 3.5, 0.75, -1.25] + [0.0] * 8])

    packed, _ = nvfp4.quantize(weight, 1.0)
    codes = e2m1.unpack(packed)[0, :8].tolist()

    assert codes == [0b0111, 0b0100, 0b1110, 0b0000, 0b0100, 0b0110, 0b0010, 0b1010]


def test_quantize_saturates_when_global_scale_is_small():
    weight = torch.full((1, 16), 6.0)

    packed, scales = nvfp4.quantize(weight, 2.0**-10)

    assert fp8_bits(scales) == [[FP8_MAX]]
    assert packed.tolist() == [[0b0111_0111] * 8], "elements above 6 should saturate to 6"


def test_quantize_all_zero_weight():
    weight = torch.zeros(4, 64, dtype=torch.bfloat16)
    global_scale = nvfp4.global_scale(weight.abs().amax())

    packed, scales = nvfp4.quantize(weight, global_scale)
    restored = nvfp4.dequantize(packed, scales, global_scale)

    assert float(global_scale) == 1.0
    assert not bool(packed.any()), "zeros should pack to zero bytes"
    assert fp8_bits(scales) == [[FP8_ONE] * 4] * 4, "empty blocks should get scale 1.0"
    assert not bool(restored.any())


def test_quantize_leading_dimensions():
    weight = gaussian_weight(6, 64, seed=3).reshape(2, 3, 64)
    global_scale = nvfp4.global_scale(weight.abs().amax())

    packed, scales = nvfp4.quantize(weight, global_scale)
    flat_packed, flat_scales = nvfp4.quantize(weight.reshape(6, 64), global_scale)

    assert packed.shape == (2, 3, 32)
    assert scales.shape == (2, 3, 4)
    assert torch.equal(packed.reshape(6, 32), flat_packed)
    assert torch.equal(scales.reshape(6, 4).view(torch.uint8), flat_scales.view(torch.uint8))


def test_quantize_does_not_modify_input():
    weight = gaussian_weight(8, 32, seed=4)
    original = weight.clone()

    nvfp4.quantize(weight, nvfp4.global_scale(weight.abs().amax()))

    assert torch.equal(weight, original)


def test_quantize_slices_match_parent_with_shared_global_scale():
    parent = gaussian_weight(64, 128, seed=5)
    global_scale = nvfp4.global_scale(parent.abs().amax())
    parent_packed, parent_scales = nvfp4.quantize(parent, global_scale)

    child_packed, child_scales = nvfp4.quantize(parent[10:40, 32:96], global_scale)

    assert torch.equal(child_packed, parent_packed[10:40, 16:48])
    assert torch.equal(
        child_scales.view(torch.uint8), parent_scales[10:40, 2:6].view(torch.uint8)
    )


def test_quantize_rejects_in_features_not_multiple_of_16():
    with pytest.raises(FormatError, match=r"shape \[3, 20\].*multiple of the block size 16"):
        nvfp4.quantize(torch.ones(3, 20), 1.0)


def test_quantize_rejects_nan():
    weight = torch.ones(2, 16)
    weight[1, 3] = float("nan")

    with pytest.raises(FormatError, match="1 NaN and 0 Inf"):
        nvfp4.quantize(weight, 1.0)


def test_quantize_rejects_nan_in_last_chunk():
    weight = torch.ones(300, 2048)
    weight[-1, -1] = float("nan")

    with pytest.raises(FormatError, match="1 NaN and 0 Inf"):
        nvfp4.quantize(weight, 1.0)


def test_quantize_rejects_inf():
    weight = torch.ones(2, 16, dtype=torch.bfloat16)
    weight[0, 0] = float("-inf")

    with pytest.raises(FormatError, match="0 NaN and 1 Inf"):
        nvfp4.quantize(weight, 1.0)


@pytest.mark.parametrize("global_scale", [0.0, -1.0, float("nan"), float("inf"), 1e-40])
def test_quantize_rejects_invalid_global_scale(global_scale):
    with pytest.raises(FormatError, match="NVFP4 global scale"):
        nvfp4.quantize(torch.ones(2, 16), global_scale)


def test_quantize_rejects_integer_weight():
    with pytest.raises(FormatError, match="torch.int32"):
        nvfp4.quantize(torch.ones(2, 16, dtype=torch.int32), 1.0)


def test_quantize_rejects_empty_weight():
    with pytest.raises(FormatError, match="at least one dimension and one element"):
        nvfp4.quantize(torch.ones(0, 16), 1.0)


def test_dequantize_hand_computed():
    packed = torch.tensor([[0b0010_0001] * 8], dtype=torch.uint8)  # codes 1, 2: 0.5, 1.0
    scales = torch.tensor([[2.0]]).to(torch.float8_e4m3fn)

    values = nvfp4.dequantize(packed, scales, 0.5, dtype=torch.float32)

    assert values.tolist() == [[0.5, 1.0] * 8]


def test_dequantize_rejects_mismatched_scale_shape():
    packed = torch.zeros(4, 16, dtype=torch.uint8)
    scales = torch.ones(4, 3).to(torch.float8_e4m3fn)

    with pytest.raises(FormatError, match=r"needs \[4, 2\]"):
        nvfp4.dequantize(packed, scales, 1.0)


def test_round_trip_sqnr_gaussian():
    weight = gaussian_weight(256, 1024, seed=6)
    global_scale = nvfp4.global_scale(weight.abs().amax())

    packed, scales = nvfp4.quantize(weight, global_scale)
    restored = nvfp4.dequantize(packed, scales, global_scale, dtype=torch.float32)

    # About 20.4 dB measured on this seed, because E2M1 keeps 1 mantissa bit.
    assert sqnr_db(weight, restored) >= 20.0


def test_round_trip_is_exact_on_representable_values():
    generator = torch.Generator().manual_seed(7)
    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    elements = magnitudes[torch.randint(0, 8, (32, 8, 16), generator=generator)]
    elements[..., 0] = 6.0  # block amax 6 * k gives block scale exactly 256 * k
    signs = torch.randint(0, 2, (32, 8, 16), generator=generator) * 2 - 1
    exponents = torch.randint(-6, 1, (32, 8, 1), generator=generator).float()
    weight = (elements * signs * torch.pow(2.0, exponents)).reshape(32, 128)

    packed, scales = nvfp4.quantize(weight, 2.0**-8)
    restored = nvfp4.dequantize(packed, scales, 2.0**-8, dtype=torch.float32)

    assert torch.equal(restored, weight)


# ModelOpt 0.47.0 oracle. NVFP4QTensor.quantize runs on CPU in pure PyTorch.

ORACLE_DTYPES = [torch.float32, torch.bfloat16]


ORACLE_WEIGHTS = {
    "gaussian": lambda: gaussian_weight(256, 512, seed=10),
    "outliers": lambda: outlier_weight(seed=11),
    "several_cpu_chunks": lambda: gaussian_weight(300, 2048, seed=12),  # 38400 blocks
}


@pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ORACLE_WEIGHTS)
def test_quantize_matches_modelopt(kind, dtype):
    weight = ORACLE_WEIGHTS[kind]().to(dtype)
    expected_packed, expected_scales, expected_global = modelopt_quantize(weight)

    global_scale = nvfp4.global_scale(weight.abs().amax())
    packed, scales = nvfp4.quantize(weight, global_scale)

    assert torch.equal(global_scale, expected_global), "global scale differs from ModelOpt"
    assert torch.equal(packed, expected_packed), "packed E2M1 bytes differ from ModelOpt"
    assert torch.equal(scales.view(torch.uint8), expected_scales.view(torch.uint8)), (
        "block scale bytes differ from ModelOpt"
    )


@pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=str)
def test_quantize_ties_match_modelopt(dtype):
    weight, global_scale = tie_weight(seed=13)
    weight = weight.to(dtype)
    expected_packed, expected_scales, _ = modelopt_quantize(weight, global_scale)

    packed, scales = nvfp4.quantize(weight, global_scale)

    assert torch.equal(packed, expected_packed), "packed E2M1 bytes differ from ModelOpt"
    assert torch.equal(scales.view(torch.uint8), expected_scales.view(torch.uint8))


@pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=str)
def test_quantize_with_parent_global_scale_matches_modelopt(dtype):
    weight = outlier_weight(seed=14).to(dtype)[:, 64:320]
    parent_global_scale = nvfp4.global_scale(outlier_weight(seed=14).abs().amax() * 4)
    expected_packed, expected_scales, _ = modelopt_quantize(weight, parent_global_scale)

    packed, scales = nvfp4.quantize(weight, parent_global_scale)

    assert torch.equal(packed, expected_packed)
    assert torch.equal(scales.view(torch.uint8), expected_scales.view(torch.uint8))


@pytest.mark.parametrize("dtype", ORACLE_DTYPES, ids=str)
def test_dequantize_matches_modelopt(dtype):
    weight = outlier_weight(seed=15).to(dtype)
    qtensor, expected_scales, expected_global = NVFP4QTensor.quantize(weight, 16)
    expected = qtensor.dequantize(
        dtype, scale=expected_scales, double_scale=expected_global, block_sizes={-1: 16}
    )

    restored = nvfp4.dequantize(qtensor._quantized_data, expected_scales, expected_global, dtype)

    assert restored.dtype == dtype
    assert torch.equal(restored, expected), "dequantized values differ from ModelOpt"


def test_e2m1_encode_matches_modelopt_cast_on_every_bf16():
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = all_bits.view(torch.bfloat16).float()
    values = values[~torch.isnan(values)]

    expected = NVFP4QTensor._cast_fp4(values.clone())

    assert torch.equal(e2m1.encode(values), expected)
