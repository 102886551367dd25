"""NF4 / FP4 blockwise quantization and double quantization against bitsandbytes, byte for byte."""

import pytest
import torch

from pefttutor import quant

bnb = pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(A, quant_type, double_quant):
    packed, state = bnb.quantize_4bit(A, blocksize=quant.BLOCK, quant_type=quant_type, compress_statistics=double_quant)
    return packed.reshape(-1), state


def test_code_tables_equal_bitsandbytes():
    assert torch.equal(quant.nf4_code(), bnb.get_4bit_type("nf4", device="cpu"))  # from N(0, 1) quantiles
    assert torch.equal(quant.FP4, bnb.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(quant.dynamic_code(), bnb.create_dynamic_map())
    code = quant.nf4_code()
    assert code[7] == 0 and code.min() == -1 and code.max() == 1 and (code > 0).sum() == 8  # exact zero, 8 + 7


@pytest.mark.parametrize("shape", [(128, 64), (37, 29), (300, 257)])  # whole blocks; a partial block and an odd count
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_and_dequantized_values_equal_bitsandbytes(shape, dtype, quant_type):
    torch.manual_seed(0)
    A = (0.05 * torch.randn(*shape)).to(dtype)
    packed, state = quant.quantize(A, quant_type)
    theirs, their_state = bnb_quantize(A, quant_type, False)
    assert torch.equal(packed, theirs) and torch.equal(state.absmax, their_state.absmax)
    ours = quant.dequantize(packed, state)
    assert ours.dtype == dtype and ours.shape == A.shape
    assert torch.equal(ours, bnb.dequantize_4bit(theirs.reshape(-1, 1), their_state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantization_equals_bitsandbytes_where_its_8_bit_search_is_exact(dtype, quant_type):
    """The absmax constants: mean subtracted, 8-bit dynamic code in blocks of 256. bitsandbytes' C search
    for the 8-bit code is not always the nearest code (in the dense region near 0); ours is. Where the
    two agree, everything else is byte for byte the same; where not, ours is never farther."""
    torch.manual_seed(0)
    A = (0.05 * torch.randn(300, 257)).to(dtype)
    packed, state = quant.quantize(A, quant_type, double_quant=True)
    theirs, their_state = bnb_quantize(A, quant_type, True)
    assert torch.equal(packed, theirs)
    assert torch.equal(state.offset, their_state.offset) and torch.equal(state.absmax2, their_state.state2.absmax)
    same = state.absmax == their_state.absmax
    assert same.float().mean() > 0.99
    _, absmax = quant._scaled_blocks(A.reshape(-1).float(), quant.BLOCK)
    x = ((absmax - state.offset).view(-1)[:len(same)] / state.absmax2.repeat_interleave(quant.BLOCK_ABSMAX)[:len(same)])
    code = quant.dynamic_code()
    assert ((x - code[state.absmax.long()]).abs() <= (x - code[their_state.absmax.long()]).abs()).all()
    their_state.absmax = state.absmax.clone()  # with our 8-bit codes, bitsandbytes dequantizes to our values
    assert torch.equal(quant.dequantize(packed, state), bnb.dequantize_4bit(theirs.reshape(-1, 1), their_state))


def test_bits_per_parameter_as_the_paper_says():
    assert quant.bits_per_parameter(False) == 4.5
    assert round(quant.bits_per_parameter(True), 3) == 4.127  # the paper's 4.127 bits
    packed, state = quant.quantize(torch.randn(256, 256), double_quant=True)
    stored = 8 * (packed.numel() + state.absmax.numel()) + 32 * (state.absmax2.numel() + 1)
    assert abs(stored / (256 * 256) - quant.bits_per_parameter(True)) < 1e-3


def test_nf4_is_more_accurate_than_fp4_on_normal_weights():
    torch.manual_seed(0)
    A = torch.randn(512, 512)
    err = {t: (quant.dequantize(*quant.quantize(A, t)) - A).pow(2).mean().item() for t in ("nf4", "fp4")}
    assert err["nf4"] < err["fp4"]


@pytest.mark.real_models
def test_smollm2_weights_equal_bitsandbytes(smollm2):
    model, _ = smollm2
    W = model.model.layers[0].self_attn.q_proj.weight.detach()
    packed, state = quant.quantize(W)
    theirs, their_state = bnb_quantize(W, "nf4", False)
    assert torch.equal(packed, theirs)
    assert torch.equal(quant.dequantize(packed, state), bnb.dequantize_4bit(theirs.reshape(-1, 1), their_state))


def test_int4_is_symmetric_absmax_rounding_to_15_levels():
    """int4 (not in bitsandbytes): q = round(7 x / absmax) in -7..7 per block of 64, so W_hat = absmax q / 7."""
    torch.manual_seed(0)
    A = torch.randn(300, 257)  # a partial last block
    packed, state = quant.quantize(A, "int4", double_quant=True)
    scaled, _ = quant._scaled_blocks(A.reshape(-1), quant.BLOCK)
    q = torch.round(7 * scaled)  # ties (measure zero here) would go to the lower level in ours
    W_hat = quant._unscaled_blocks(q / 7, _absmax(state), quant.BLOCK)
    assert torch.equal(quant.dequantize(packed, state), W_hat.view(A.shape))
    assert len(quant.INT4) == 15 and quant.INT4[7] == 0 and torch.equal(quant.INT4, -quant.INT4.flip(0))
    err = {t: (quant.dequantize(*quant.quantize(A, t)) - A).pow(2).mean().item() for t in ("nf4", "int4")}
    assert err["nf4"] < err["int4"]  # normal weights: NF4's quantile levels beat even spacing


def _absmax(state):
    """The absmax constants a state dequantizes with (undoing double quantization)."""
    if state.absmax2 is None:
        return state.absmax
    codes = quant.dynamic_code()[state.absmax.long()]
    return quant._unscaled_blocks(codes, state.absmax2, quant.BLOCK_ABSMAX) + state.offset


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="valid: nf4, fp4, int4"):
        quant.quantize(torch.randn(4, 4), "int8")
    with pytest.raises(ValueError, match="fp32, bf16 or fp16"):
        quant.quantize(torch.ones(4, 4, dtype=torch.int64))
