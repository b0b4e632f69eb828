"""Hand-computed E2M1 rounding, codes and nibble packing."""

import pytest
import torch

from elastic_cli.formats import e2m1
from elastic_cli.formats.errors import FormatError

MAGNITUDE_CODES = [
    (0.0, 0b000),
    (0.5, 0b001),
    (1.0, 0b010),
    (1.5, 0b011),
    (2.0, 0b100),
    (3.0, 0b101),
    (4.0, 0b110),
    (6.0, 0b111),
]

# Every value exactly halfway between two E2M1 magnitudes, with the even-index result.
TIES = [
    (0.25, 0.0, 0b000),
    (0.75, 1.0, 0b010),
    (1.25, 1.0, 0b010),
    (1.75, 2.0, 0b100),
    (2.5, 2.0, 0b100),
    (3.5, 4.0, 0b110),
    (5.0, 4.0, 0b110),
]


def brute_force_codes(values: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code by distance, ties to the even index, saturating at 6."""
    magnitudes = torch.tensor([m for m, _ in MAGNITUDE_CODES], dtype=torch.float64)
    magnitude = values.double().abs().clamp(max=6.0)
    distance = (magnitude.unsqueeze(-1) - magnitudes).abs()  # [..., 8]
    nearest = distance.min(dim=-1, keepdim=True).values
    candidates = distance == nearest  # one or two adjacent indices
    index = torch.arange(8)
    # Among tied candidates prefer the even index.
    preference = torch.where(candidates, (index % 2) * 10 + index, torch.full_like(index, 1000))
    code = preference.argmin(dim=-1)
    sign = (values < 0).to(torch.int64) << 3
    return (code | sign).to(torch.uint8)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize(
    "magnitude,index", MAGNITUDE_CODES, ids=[str(m) for m, _ in MAGNITUDE_CODES]
)
def test_encode_exact_value(magnitude, index, sign):
    value = sign * magnitude
    expected = index | (0b1000 if value < 0 else 0)

    code = e2m1.encode(torch.tensor([value]))
    decoded = e2m1.decode(code)

    assert code.tolist() == [expected], f"{value} should encode as {expected:04b}"
    assert decoded.tolist() == [value], f"code {expected:04b} should decode to {value}"


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["positive", "negative"])
@pytest.mark.parametrize("tie,rounded,index", TIES, ids=[str(t) for t, _, _ in TIES])
def test_encode_tie_rounds_to_even(tie, rounded, index, sign):
    expected = index | (0b1000 if sign < 0 else 0)

    code = e2m1.encode(torch.tensor([sign * tie]))

    assert code.tolist() == [expected], f"{sign * tie} should round to {sign * rounded}"


@pytest.mark.parametrize("tie,rounded,index", TIES, ids=[str(t) for t, _, _ in TIES])
def test_encode_next_to_tie_rounds_to_nearest(tie, rounded, index):
    below = torch.nextafter(torch.tensor(tie), torch.tensor(0.0))
    above = torch.nextafter(torch.tensor(tie), torch.tensor(10.0))

    code_below = int(e2m1.encode(below.reshape(1)))
    code_above = int(e2m1.encode(above.reshape(1)))

    assert code_above == code_below + 1, f"values around {tie} should fall on both sides"
    assert index in (code_below, code_above), f"{tie} should sit between its neighbours"


@pytest.mark.parametrize("value", [6.0001, 7.0, 100.0, 1e30, float("inf")])
def test_encode_saturates_beyond_max(value):
    codes = e2m1.encode(torch.tensor([value, -value]))

    assert codes.tolist() == [0b0111, 0b1111], f"+-{value} should saturate to +-6"


def test_encode_small_negative_keeps_sign():
    codes = e2m1.encode(torch.tensor([-0.1, -0.25, -1e-30]))

    assert codes.tolist() == [0b1000, 0b1000, 0b1000]


def test_encode_negative_zero_is_positive_zero():
    code = e2m1.encode(torch.tensor([-0.0]))

    assert code.tolist() == [0b0000]


def test_encode_matches_brute_force_on_every_bf16():
    all_bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    values = all_bits.view(torch.bfloat16)
    values = values[~torch.isnan(values)]

    codes = e2m1.encode(values)
    expected = brute_force_codes(values.float())

    mismatches = (codes != expected).nonzero().flatten()
    assert mismatches.numel() == 0, f"first mismatches at {values[mismatches[:5]].tolist()}"


def test_encode_matches_brute_force_on_float32_sweep():
    generator = torch.Generator().manual_seed(0)
    uniform = torch.rand(200_000, generator=generator) * 16 - 8
    ties = torch.tensor([t for t, _, _ in TIES])
    neighbours = torch.cat(
        [
            torch.nextafter(ties, torch.zeros_like(ties)),
            torch.nextafter(ties, torch.full_like(ties, 10.0)),
        ]
    )
    values = torch.cat([uniform, ties, -ties, neighbours, -neighbours])

    codes = e2m1.encode(values)

    assert torch.equal(codes, brute_force_codes(values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encode_half_precision_matches_float32(dtype):
    values = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.3, 7.0]).to(dtype)

    assert torch.equal(e2m1.encode(values), e2m1.encode(values.float()))


def test_encode_does_not_modify_input():
    values = torch.tensor([-0.0, -3.3, 9.0])
    original = values.clone()

    e2m1.encode(values)

    assert torch.equal(values.view(torch.int32), original.view(torch.int32))


def test_encode_rejects_nan():
    with pytest.raises(FormatError, match="1 NaN"):
        e2m1.encode(torch.tensor([1.0, float("nan")]))


def test_encode_rejects_integer_dtype():
    with pytest.raises(FormatError, match="torch.int64"):
        e2m1.encode(torch.tensor([1, 2]))


def test_round_to_e2m1_values():
    values = torch.tensor([0.3, 0.74, 0.76, 2.4, 2.6, 4.9, 5.1, -1.3, 8.0])

    rounded = e2m1.round_to_e2m1(values)

    assert rounded.tolist() == [0.5, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, -1.5, 6.0]


def test_decode_negative_zero_code():
    value = e2m1.decode(torch.tensor([0b1000], dtype=torch.uint8))

    assert value.tolist() == [0.0]
    assert bool(torch.signbit(value)), "code 0b1000 should decode to -0.0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_output_dtype(dtype):
    values = e2m1.decode(torch.arange(16, dtype=torch.uint8), dtype)

    assert values.dtype == dtype
    assert values.tolist() == [0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6]


def test_decode_rejects_code_above_15():
    with pytest.raises(FormatError, match="0..15"):
        e2m1.decode(torch.tensor([16], dtype=torch.uint8))


@pytest.mark.parametrize(
    "low,high,byte",
    [
        (0b0001, 0b0010, 0b0010_0001),
        (0b1111, 0b0000, 0b0000_1111),
        (0b0000, 0b1111, 0b1111_0000),
        (0b0111, 0b1000, 0b1000_0111),
        (0b1010, 0b0101, 0b0101_1010),
    ],
)
def test_pack_low_nibble_first(low, high, byte):
    packed = e2m1.pack(torch.tensor([low, high], dtype=torch.uint8))

    assert packed.tolist() == [byte], f"codes {low:04b}, {high:04b} should pack to {byte:08b}"


def test_pack_two_dimensional_shape():
    codes = torch.tensor([[1, 2, 3, 4], [15, 14, 0, 8]], dtype=torch.uint8)

    packed = e2m1.pack(codes)

    assert packed.shape == (2, 2)
    assert packed.tolist() == [[0b0010_0001, 0b0100_0011], [0b1110_1111, 0b1000_0000]]


def test_pack_rejects_odd_length():
    with pytest.raises(FormatError, match=r"shape \[3\]"):
        e2m1.pack(torch.tensor([1, 2, 3], dtype=torch.uint8))


def test_pack_rejects_code_above_15():
    with pytest.raises(FormatError, match="found 16"):
        e2m1.pack(torch.tensor([16, 0], dtype=torch.uint8))


def test_unpack_inverts_pack_for_every_byte():
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(16, 16)

    codes = e2m1.unpack(every_byte)

    assert codes.shape == (16, 32)
    assert torch.equal(codes[:, 0::2], every_byte & 0x0F), "low nibble should come first"
    assert torch.equal(codes[:, 1::2], every_byte >> 4), "high nibble should come second"
    assert torch.equal(e2m1.pack(codes), every_byte)


def test_unpack_rejects_non_uint8():
    with pytest.raises(FormatError, match="uint8"):
        e2m1.unpack(torch.tensor([1, 2], dtype=torch.int16))
