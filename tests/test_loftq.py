import pytest
import torch

from lowmem.loftq import loftq_init
from lowmem.quantize import dequantize, quantize
from lowmem.reference import loftq_residual


@pytest.mark.parametrize("codebook", ["int", "nf4"])
def test_one_step_is_the_rank_r_svd_of_the_quantization_residual(codebook):
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    q, a, b = loftq_init(w, r=8, scale=2.0, iters=1, codebook=codebook)
    assert torch.equal(q.codes, quantize(w, codebook=codebook).codes)  # step 1 quantizes W
    assert torch.allclose(2.0 * b @ a, loftq_residual(w, dequantize(q), 8), atol=1e-4)


def test_loftq_init_brings_base_plus_adapter_closer_to_the_fp32_weights():
    from lowmem.config import StackConfig
    from lowmem.models import base_model, build_model
    from lowmem.stack import apply_stack

    torch.manual_seed(0)
    fp32 = {n: p.detach().clone() for n, p in build_model("tiny-llama").named_parameters()}
    for iters in (1, 3):
        torch.manual_seed(0)
        cfg = StackConfig.from_flat("quantize", lora_r=4, quant_loftq_iters=iters)
        model = base_model(apply_stack(build_model("tiny-llama"), cfg))
        layers = [m for m in model.modules() if hasattr(m, "lora_A")]
        assert len(layers) == 4  # q_proj and v_proj of 2 layers
        for name, m in model.named_modules():
            if not hasattr(m, "lora_A"):
                continue
            w = fp32[f"{name}.weight"]
            with torch.no_grad():
                adapter = (
                    m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
                )
            base = dequantize(m.base_layer.qweight)
            with_adapter = float((w - base - adapter).norm())
            base_alone = float((w - dequantize(quantize(w))).norm())  # peft's init: B = 0
            assert with_adapter < 0.9 * base_alone
            x = torch.randn(3, 64)  # the layer computes base + scaled adapter, as peft does
            assert torch.allclose(m(x), x @ (base + adapter).T, atol=1e-5)


def test_keep_codes_fits_the_adapters_to_the_gptq_residual():
    """quant_loftq_keep_codes: q/v keep GPTQ's codes (not re-rounded to nearest) and their
    adapters are the rank-r SVD of W - deq(Q_gptq), which brings base + adapter closer to W."""
    from lowmem.config import StackConfig
    from lowmem.models import base_model, build_model
    from lowmem.stack import apply_stack

    torch.manual_seed(0)
    fp32 = {n: p.detach().clone() for n, p in build_model("tiny-llama").named_parameters()}
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    built = {}
    for keep in (False, True):
        torch.manual_seed(0)
        flat = dict(lora_r=4, quant_method="gptq", quant_loftq_iters=int(keep))
        cfg = StackConfig.from_flat("quantize", quant_loftq_keep_codes=keep, **flat)
        built[keep] = base_model(apply_stack(build_model("tiny-llama"), cfg, calibration=ids))
    adapted = [n for n, m in built[True].named_modules() if hasattr(m, "lora_A")]
    assert len(adapted) == 4
    for name in adapted:
        gptq, kept = built[False].get_submodule(name), built[True].get_submodule(name)
        assert torch.equal(kept.base_layer.qweight.codes, gptq.base_layer.qweight.codes)
        w, base = fp32[f"{name}.weight"], dequantize(kept.base_layer.qweight)
        a, b = kept.lora_A["default"].weight, kept.lora_B["default"].weight
        adapter = kept.scaling["default"] * (b @ a).detach()
        assert torch.allclose(adapter, loftq_residual(w, base, 4), atol=1e-4)
        assert float((w - base - adapter).norm()) < float((w - base).norm())


def test_keep_codes_needs_exactly_one_loftq_step():
    from lowmem.config import StackConfig

    with pytest.raises(ValueError, match="bad quant_loftq_keep_codes=True: must be false unless"):
        StackConfig.from_flat("quantize", quant_method="gptq", quant_loftq_keep_codes=True)
    with pytest.raises(ValueError, match="bad loftq iters=2 with codes to keep: must be 1"):
        w = torch.randn(8, 32)
        loftq_init(w, r=2, scale=1.0, iters=2, keep=quantize(w))
