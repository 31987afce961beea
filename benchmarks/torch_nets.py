"""PyTorch versions of jaxseg's RSUNet and MedNeXt, written for the training-step benchmark only.

They follow the same architecture descriptions as ``jaxseg.models`` (``docs/models.md``):
same layers, same widths, same parameter counts (``train_step.py`` checks the counts agree before
timing), so a step of one is the same arithmetic as a step of the other. Channels-first
``[b, c, z, y, x]`` as PyTorch expects; the benchmark uses ``channels_last_3d`` memory format on
GPU, as a tuned PyTorch training script would.

Not part of the jaxseg package: torch is not a jaxseg dependency.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _groups(channels: int, groups: int) -> int:
  """PyTC's rule: decrement the group count until it divides the channel count."""
  while channels % groups:
    groups -= 1
  return groups


def _norm_act(channels: int, groups: int) -> nn.Sequential:
  return nn.Sequential(nn.GroupNorm(_groups(channels, groups), channels), nn.ELU())


def _conv(cin: int, cout: int, kernel: tuple[int, int, int]) -> nn.Conv3d:
  return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=False)


class _ConvBlock(nn.Module):
  """NormAct -> conv, a pre-activation residual pair, NormAct -> conv (RSUNet's ConvBlock)."""

  def __init__(self, cin, cout, kernel, groups):
    super().__init__()
    self.pre = nn.Sequential(_norm_act(cin, groups), _conv(cin, cout, kernel))
    self.res = nn.Sequential(
      _norm_act(cout, groups),
      _conv(cout, cout, kernel),
      _norm_act(cout, groups),
      _conv(cout, cout, kernel),
    )
    self.post = nn.Sequential(_norm_act(cout, groups), _conv(cout, cout, kernel))

  def forward(self, x):
    x = self.pre(x)
    x = x + self.res(x)
    return self.post(x)


class _BilinearUp(nn.Module):
  """Fixed depthwise transposed conv (kernel (1, 4, 4), stride (1, 2, 2)) with taps .25/.75."""

  def __init__(self, channels):
    super().__init__()
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    kernel = (taps[:, None] * taps[None, :])[None, None, None]  # [1, 1, 1, 4, 4]
    self.register_buffer("weight", kernel.repeat(channels, 1, 1, 1, 1))
    self.channels = channels

  def forward(self, x):
    weight = self.weight.to(x.dtype)
    return F.conv_transpose3d(x, weight, stride=(1, 2, 2), padding=(0, 1, 1), groups=self.channels)


class RSUNet(nn.Module):
  """RSUNet (PyTC profile ``rsunet``): (1, 2, 2) pooling, additive skips, no conv biases."""

  def __init__(self, in_channels=1, out_channels=12, widths=(18, 36, 48, 64, 80), groups=4):
    super().__init__()
    k2d, k3d = (1, 3, 3), (3, 3, 3)
    self.inp = _ConvBlock(in_channels, widths[0], k2d, groups)
    self.down = nn.ModuleList(
      _ConvBlock(widths[i], widths[i + 1], k3d, groups) for i in range(len(widths) - 1)
    )
    self.up = nn.ModuleList()
    self.up_proj = nn.ModuleList()
    self.up_block = nn.ModuleList()
    for i in reversed(range(len(widths) - 1)):
      self.up.append(_BilinearUp(widths[i + 1]))
      self.up_proj.append(nn.Conv3d(widths[i + 1], widths[i], 1, bias=False))
      self.up_block.append(_ConvBlock(widths[i], widths[i], k2d if i == 0 else k3d, groups))
    self.head = nn.Sequential(_norm_act(widths[0], groups), nn.Conv3d(widths[0], out_channels, 1))
    for m in self.modules():
      if isinstance(m, nn.Conv3d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")

  def forward(self, x):
    x = self.inp(x)
    skips = []
    for block in self.down:
      skips.append(x)
      x = block(F.max_pool3d(x, (1, 2, 2)))
    for up, proj, block in zip(self.up, self.up_proj, self.up_block, strict=True):
      x = block(proj(up(x)) + skips.pop())
    return self.head(x)


MEDNEXT_SIZES = {
  # name: (expansion ratios, block counts), ordered enc0-3, bottleneck, dec3-0
  "S": ((2,) * 9, (2,) * 9),
  "B": ((2, 3, 4, 4, 4, 4, 4, 3, 2), (2,) * 9),
  "M": ((2, 3, 4, 4, 4, 4, 4, 3, 2), (3, 4, 4, 4, 4, 4, 4, 4, 3)),
  "L": ((3, 4, 8, 8, 8, 8, 8, 4, 3), (3, 4, 8, 8, 8, 8, 8, 4, 3)),
}


class _MedNeXtBlock(nn.Module):
  """Depthwise conv -> GroupNorm(groups = C) -> 1x1 expand -> GELU -> 1x1 (-> + input)."""

  def __init__(self, cin, cout, expansion, kernel, residual=True, mode="same"):
    super().__init__()
    if mode == "same":
      self.conv1 = nn.Conv3d(cin, cin, kernel, padding=kernel // 2, groups=cin)
    elif mode == "down":
      self.conv1 = nn.Conv3d(cin, cin, kernel, stride=2, padding=kernel // 2, groups=cin)
    else:
      self.conv1 = nn.ConvTranspose3d(cin, cin, kernel, stride=2, padding=kernel // 2, groups=cin)
    self.norm = nn.GroupNorm(cin, cin)
    self.conv2 = nn.Conv3d(cin, expansion * cin, 1)
    self.conv3 = nn.Conv3d(expansion * cin, cout, 1)
    self.residual = residual

  def forward(self, x):
    y = self.conv3(F.gelu(self.conv2(self.norm(self.conv1(x)))))
    return x + y if self.residual else y


class _MedNeXtDown(nn.Module):
  def __init__(self, cin, cout, expansion, kernel):
    super().__init__()
    self.block = _MedNeXtBlock(cin, cout, expansion, kernel, residual=False, mode="down")
    self.res = nn.Conv3d(cin, cout, 1, stride=2)

  def forward(self, x):
    return self.block(x) + self.res(x)


class _MedNeXtUp(nn.Module):
  """Transposed depthwise conv gives 2n - 1 voxels; one leading voxel per axis makes 2n."""

  def __init__(self, cin, cout, expansion, kernel):
    super().__init__()
    self.block = _MedNeXtBlock(cin, cout, expansion, kernel, residual=False, mode="up")
    self.res = nn.ConvTranspose3d(cin, cout, 1, stride=2)

  def forward(self, x):
    pad = (1, 0, 1, 0, 1, 0)
    return F.pad(self.block(x), pad) + F.pad(self.res(x), pad)


class _Checkpointed(nn.Module):
  """Gradient checkpointing around one block (MedNeXt's ``outside_block``)."""

  def __init__(self, module, enabled):
    super().__init__()
    self.module = module
    self.enabled = enabled

  def forward(self, x):
    if self.enabled and x.requires_grad:
      return torch.utils.checkpoint.checkpoint(self.module, x, use_reentrant=False)
    return self.module(x)


class MedNeXt(nn.Module):
  """MedNeXt v1: 1x1 stem, 4 isotropic stride-2 stages (32 -> 512), additive skips."""

  def __init__(self, in_channels=1, out_channels=6, size="L", kernel=3, checkpoint=True):
    super().__init__()
    expansion, blocks = MEDNEXT_SIZES[size]
    widths = [32 * 2**i for i in range(5)]

    def stage(level, width):
      return nn.Sequential(
        *(
          _Checkpointed(_MedNeXtBlock(width, width, expansion[level], kernel), checkpoint)
          for _ in range(blocks[level])
        )
      )

    self.stem = nn.Conv3d(in_channels, widths[0], 1)
    self.enc = nn.ModuleList(stage(i, widths[i]) for i in range(4))
    self.down = nn.ModuleList(
      _Checkpointed(_MedNeXtDown(widths[i], widths[i + 1], expansion[i + 1], kernel), checkpoint)
      for i in range(4)
    )
    self.bottleneck = stage(4, widths[4])
    self.up = nn.ModuleList(
      _Checkpointed(_MedNeXtUp(widths[4 - i], widths[3 - i], expansion[5 + i], kernel), checkpoint)
      for i in range(4)
    )
    self.dec = nn.ModuleList(stage(5 + i, widths[3 - i]) for i in range(4))
    self.out = nn.Conv3d(widths[0], out_channels, 1)

  def forward(self, x):
    x = self.stem(x)
    skips = []
    for enc, down in zip(self.enc, self.down, strict=True):
      x = enc(x)
      skips.append(x)
      x = down(x)
    x = self.bottleneck(x)
    for up, dec in zip(self.up, self.dec, strict=True):
      x = dec(up(x) + skips.pop())
    return self.out(x)


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())
