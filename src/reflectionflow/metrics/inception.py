"""Inception-v3 as FID uses it, in plain torch (no torchvision), loadable from a local file.

The module names and shapes are torchvision's `Inception3`, so pytorch-fid's weights file
(`pt_inception-2015-12-05-6726825d.pth`, the TF FID network ported to torch, 1008 classes) loads
as it is; `fid_variant` reproduces pytorch-fid's FIDInception blocks (average pools that do not
count the padding, a max pool in the last block), which is what makes its features match TF FID.
`width` scales every channel count: tests build a tiny random network from a config and save it
as safetensors with the config in the file's metadata.

Features: images resized to `image_size` (bilinear, pytorch-fid's resize), scaled to [-1, 1],
through Mixed_7c, average-pooled: (N, 2048 x width).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


class InceptionError(ValueError):
    """An --inception-path that is not an Inception-v3 FID weights file."""


@dataclass
class InceptionConfig:
    width: float = 1.0  # channel multiplier (1.0: the real network)
    image_size: int = 299
    num_classes: int = 1008  # pytorch-fid's port keeps TF's 1008 logits; only the features are used
    fid_variant: bool = True  # pytorch-fid's FIDInception blocks

    def ch(self, n: int) -> int:
        return max(1, round(n * self.width))


INCEPTION_SIZES = {
    "fid": lambda: InceptionConfig(),
    "tiny": lambda: InceptionConfig(width=1 / 16, image_size=75, num_classes=10),  # the smallest input it takes
}


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg(x, fid: bool):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=not fid)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool: int, c: InceptionConfig):
        super().__init__()
        self.fid = c.fid_variant
        self.branch1x1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, c.ch(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c.ch(48), c.ch(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(64), c.ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c.ch(96), c.ch(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, c.ch(pool), kernel_size=1)
        self.out_channels = c.ch(64) * 2 + c.ch(96) + c.ch(pool)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), b3,
                          self.branch_pool(_avg(x, self.fid))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int, c: InceptionConfig):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, c.ch(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(64), c.ch(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c.ch(96), c.ch(96), kernel_size=3, stride=2)
        self.out_channels = c.ch(384) + c.ch(96) + cin

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, c7: int, c: InceptionConfig):
        super().__init__()
        self.fid = c.fid_variant
        c7 = c.ch(c7)
        self.branch1x1 = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c.ch(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c.ch(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.out_channels = c.ch(192) * 4

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg(x, self.fid))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int, c: InceptionConfig):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c.ch(192), c.ch(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c.ch(192), c.ch(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c.ch(192), c.ch(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c.ch(192), c.ch(192), kernel_size=3, stride=2)
        self.out_channels = c.ch(320) + c.ch(192) + cin

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int, c: InceptionConfig, pool: str):
        super().__init__()
        self.pool = pool  # "avg" (torchvision), "avg-fid" (Mixed_7b of FID) or "max" (Mixed_7c of FID)
        self.branch1x1 = BasicConv2d(cin, c.ch(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c.ch(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c.ch(384), c.ch(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c.ch(384), c.ch(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c.ch(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c.ch(448), c.ch(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c.ch(384), c.ch(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c.ch(384), c.ch(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c.ch(192), kernel_size=1)
        self.out_channels = c.ch(320) + 4 * c.ch(384) + c.ch(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else _avg(x, self.pool == "avg-fid")
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    def __init__(self, config: InceptionConfig):
        super().__init__()
        c = self.config = config
        self.Conv2d_1a_3x3 = BasicConv2d(3, c.ch(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c.ch(32), c.ch(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c.ch(32), c.ch(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c.ch(64), c.ch(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c.ch(80), c.ch(192), kernel_size=3)
        self.Mixed_5b = InceptionA(c.ch(192), 32, c)
        self.Mixed_5c = InceptionA(self.Mixed_5b.out_channels, 64, c)
        self.Mixed_5d = InceptionA(self.Mixed_5c.out_channels, 64, c)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, c)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, 128, c)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, 160, c)
        self.Mixed_6d = InceptionC(self.Mixed_6c.out_channels, 160, c)
        self.Mixed_6e = InceptionC(self.Mixed_6d.out_channels, 192, c)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, c)
        self.Mixed_7b = InceptionE(self.Mixed_7a.out_channels, c, "avg-fid" if c.fid_variant else "avg")
        self.Mixed_7c = InceptionE(self.Mixed_7b.out_channels, c, "max" if c.fid_variant else "avg")
        self.feature_dim = self.Mixed_7c.out_channels
        self.fc = nn.Linear(self.feature_dim, c.num_classes)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # He-normal convolutions keep a random network's activations from vanishing over its ~50
        # layers (torch's default init shrinks them ~3x per layer): a random tiny network then
        # gives features that tell images apart, which is what the tests need. Real use loads weights.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [0, 1] -> (B, feature_dim) pool3 features."""
        s = self.config.image_size
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, C, h, w) -> (B, C)


def save_inception(model: InceptionV3, path: str | Path) -> None:
    """safetensors with the config in the file's metadata (what `load_inception` reads back)."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"config": json.dumps(asdict(model.config))})


def check_inception_path(path: str | None) -> Path:
    if not path:
        raise InceptionError("--metric fid needs --inception-path FILE: Inception-v3 FID weights, e.g. pytorch-fid's "
                             "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid releases)")
    p = Path(path).expanduser()
    if not p.is_file():
        raise InceptionError(f"--inception-path {p}: no such file")
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise InceptionError(f"--inception-path {p}: expected a weights file ({', '.join(WEIGHT_SUFFIXES)})")
    return p


def load_inception(path: str | Path) -> InceptionV3:
    """The network of a weights file: safetensors (config in its metadata, else the real network)
    or a torch state dict (the real network: pytorch-fid's file)."""
    p = check_inception_path(str(path))
    config = InceptionConfig()
    try:
        if p.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
            if "config" in meta:
                config = InceptionConfig(**json.loads(meta["config"]))
            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: say which and why, in one line
        raise InceptionError(f"--inception-path {p}: cannot be read ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise InceptionError(f"--inception-path {p}: not a state dict")
    model = InceptionV3(config)
    want = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}  # torchvision's, unused
    # Not needed for features (and absent from some checkpoints): BN step counters, the classifier.
    optional = {k for k in want if k.endswith("num_batches_tracked") or k.startswith("fc.")}
    missing = sorted(set(want) - set(state) - optional)
    unexpected = sorted(set(state) - set(want))
    wrong = sorted(k for k in set(want) & set(state) if tuple(want[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{n} {what} (e.g. {', '.join(ks[:3])})" for what, ks in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if ks
                 for n in [len(ks)]]
        raise InceptionError(f"--inception-path {p}: not the Inception-v3 FID network of config {asdict(config)}: "
                             + "; ".join(parts))
    model.load_state_dict(state, strict=False)  # strictness checked above, the optional keys aside
    return model.eval()
