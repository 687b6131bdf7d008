"""GPU path: front end, SpecAugment and mixup on the device; bf16 training keeps an fp32 log-mel."""

from __future__ import annotations

import pytest
import torch

from polyfm.audio.models import Cnn14
from polyfm.audio.models.frontend import do_mixup, mixup_lambdas
from polyfm.audio.objectives import AudioSetTagging

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_frontend_on_cuda_matches_cpu() -> None:
    model = Cnn14(base_channels=8, classes_num=5).eval()
    x = 0.1 * torch.randn(2, 32000, generator=torch.Generator().manual_seed(0))
    expected = model.frontend(x)
    got = model.cuda().frontend(x.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, atol=1e-3, rtol=0)


def test_bf16_training_step_on_cuda() -> None:
    model = Cnn14(base_channels=8, classes_num=5).cuda().train()
    x = 0.1 * torch.randn(4, 32000, device="cuda")
    target = (torch.rand(4, 5, device="cuda") > 0.5).float()
    lam = mixup_lambdas(4, 1.0, device="cuda")
    assert lam.device.type == "cuda" and do_mixup(target, lam).shape == (2, 5)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert model.frontend(x).dtype == torch.float32
        loss = AudioSetTagging(mixup_alpha=1.0)(model, {"input": x, "target": target})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and model.conv_block1.conv1.weight.grad is not None
