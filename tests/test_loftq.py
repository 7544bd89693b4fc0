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
