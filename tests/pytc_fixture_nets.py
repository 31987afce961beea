"""PyTorch networks with PyTC's module names, the fixture of ``import_checkpoint_test.py``.

Written for the test from the structure of PyTC's ``connectomics/models/arch/rsunet.py`` (RSUNet:
``input_conv``, ``down_blocks[d].conv``, ``up_blocks[i].up/proj/conv``, ``final_norm``,
``output_head``; every ``ConvBlock`` as ``pre`` / ``res`` / ``post``, ``NormAct`` holding
``.norm``) and of MedNeXt v1 (``MIC-DKFZ/MedNeXt``: ``stem``, ``enc_block_i``, ``down_i``,
``bottleneck``, ``up_i``, ``dec_block_i``, ``out_0.conv_out``, ``dummy_tensor``; blocks
``conv1`` / ``norm`` / ``conv2`` / ``conv3`` / ``res_conv``), with PyTC's wrappers: the Lightning
module keeps the network as ``model`` and MedNeXt sits in ``MedNeXtWrapper.model``. So their
``state_dict()`` keys and shapes are those of a PyTC checkpoint. Weights are random (PyTorch's
default init, norms perturbed so that their parameters matter). ``[b, c, z, y, x]`` tensors.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class NormAct(nn.Module):
  """GroupNorm (groups decremented until they divide the width) then ELU; ``.norm``, ``.act``."""

  def __init__(self, channels: int, groups: int):
    super().__init__()
    groups = min(groups, channels)
    while channels % groups:
      groups -= 1
    self.norm = nn.GroupNorm(groups, channels)
    self.act = nn.ELU()

  def forward(self, x):
    return self.act(self.norm(x))


def _conv(cin, cout, kernel):
  return nn.Conv3d(cin, cout, kernel, padding=tuple(k // 2 for k in kernel), bias=False)


class ResBlock(nn.Module):
  def __init__(self, channels, kernel, groups):
    super().__init__()
    self.norm_act1 = NormAct(channels, groups)
    self.conv1 = _conv(channels, channels, kernel)
    self.norm_act2 = NormAct(channels, groups)
    self.conv2 = _conv(channels, channels, kernel)

  def forward(self, x):
    return x + self.conv2(self.norm_act2(self.conv1(self.norm_act1(x))))


class ConvBlock(nn.Module):
  def __init__(self, cin, cout, kernel, groups):
    super().__init__()
    self.pre = nn.Sequential(NormAct(cin, groups), _conv(cin, cout, kernel))
    self.res = ResBlock(cout, kernel, groups)
    self.post = nn.Sequential(NormAct(cout, groups), _conv(cout, cout, kernel))

  def forward(self, x):
    return self.post(self.res(self.pre(x)))


class DownBlock(nn.Module):
  def __init__(self, cin, cout, factor, kernel, groups):
    super().__init__()
    self.pool = nn.MaxPool3d(factor)
    self.conv = ConvBlock(cin, cout, kernel, groups)

  def forward(self, x):
    return self.conv(self.pool(x))


class BilinearUp(nn.Module):
  """Depthwise transposed conv with a fixed bilinear kernel, kept as the buffer ``weight``."""

  def __init__(self, channels, factor):
    super().__init__()
    self.factor = tuple(factor)
    self.groups = channels
    size = [2 * f - f % 2 for f in factor]
    self.padding = [math.ceil((f - 1) / 2) for f in factor]
    taps = []
    for f, n in zip(factor, size, strict=True):
      centre = (n - 1) / 2
      taps.append(torch.tensor([1 - abs(i - centre) / f for i in range(n)]))
    kernel = taps[0][:, None, None] * taps[1][None, :, None] * taps[2][None, None, :]
    self.register_buffer("weight", kernel.expand(channels, 1, *size).clone())

  def forward(self, x):
    return F.conv_transpose3d(
      x, self.weight, stride=self.factor, padding=self.padding, groups=self.groups
    )


class UpBlock(nn.Module):
  def __init__(self, cin, cout, factor, kernel, groups):
    super().__init__()
    self.up = BilinearUp(cin, factor)
    self.proj = nn.Conv3d(cin, cout, 1, bias=False)
    self.conv = ConvBlock(cout, cout, kernel, groups)

  def forward(self, x, skip):
    return self.conv(self.proj(self.up(x)) + skip)


class RSUNet(nn.Module):
  """PyTC's RSUNet layout (group norm, ELU, 2D kernels for the first ``depth_2d`` levels)."""

  def __init__(self, cin, cout, width, factor=(1, 2, 2), groups=4, depth_2d=1):
    super().__init__()
    depth = len(width) - 1
    kernels = [(1, 3, 3) if i < depth_2d else (3, 3, 3) for i in range(len(width))]
    self.input_conv = ConvBlock(cin, width[0], kernels[0], groups)
    self.down_blocks = nn.ModuleList(
      [DownBlock(width[d], width[d + 1], factor, kernels[d + 1], groups) for d in range(depth)]
    )
    self.up_blocks = nn.ModuleList(
      [UpBlock(width[d + 1], width[d], factor, kernels[d], groups) for d in reversed(range(depth))]
    )
    self.final_norm = NormAct(width[0], groups)
    self.output_head = nn.Conv3d(width[0], cout, 1)

  def forward(self, x):
    x = self.input_conv(x)
    skips = []
    for down in self.down_blocks:
      skips.append(x)
      x = down(x)
    for up in self.up_blocks:
      x = up(x, skips.pop())
    return self.output_head(self.final_norm(x))


class MedNeXtBlock(nn.Module):
  """Depthwise conv1 -> GroupNorm(C groups) -> conv2 (expand) -> GELU -> conv3; + x if residual."""

  def __init__(self, cin, cout, exp, kernel, residual=True, stride=1, transposed=False):
    super().__init__()
    self.do_res = residual
    conv = nn.ConvTranspose3d if transposed else nn.Conv3d
    self.conv1 = conv(cin, cin, kernel, stride=stride, padding=kernel // 2, groups=cin)
    self.norm = nn.GroupNorm(cin, cin)
    self.conv2 = nn.Conv3d(cin, exp * cin, 1)
    self.act = nn.GELU()
    self.conv3 = nn.Conv3d(exp * cin, cout, 1)

  def forward(self, x):
    y = self.conv3(self.act(self.conv2(self.norm(self.conv1(x)))))
    return x + y if self.do_res else y


class MedNeXtDown(MedNeXtBlock):
  def __init__(self, cin, cout, exp, kernel):
    super().__init__(cin, cout, exp, kernel, residual=False, stride=2)
    self.res_conv = nn.Conv3d(cin, cout, 1, stride=2)

  def forward(self, x):
    return super().forward(x) + self.res_conv(x)


class MedNeXtUp(MedNeXtBlock):
  def __init__(self, cin, cout, exp, kernel):
    super().__init__(cin, cout, exp, kernel, residual=False, stride=2, transposed=True)
    self.res_conv = nn.ConvTranspose3d(cin, cout, 1, stride=2)

  def forward(self, x):
    # 2n - 1 voxels from both; one zero voxel in front of each spatial axis makes 2n.
    y = F.pad(super().forward(x), (1, 0, 1, 0, 1, 0))
    return y + F.pad(self.res_conv(x), (1, 0, 1, 0, 1, 0))


class OutBlock(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.conv_out = nn.ConvTranspose3d(cin, cout, 1)

  def forward(self, x):
    return self.conv_out(x)


# (expansion ratios, blocks per stage) of create_mednextv1_{small, base, medium, large}
MEDNEXT_SIZES = {
  "S": ([2] * 9, [2] * 9),
  "B": ([2, 3, 4, 4, 4, 4, 4, 3, 2], [2] * 9),
  "M": ([2, 3, 4, 4, 4, 4, 4, 3, 2], [3, 4, 4, 4, 4, 4, 4, 4, 3]),
  "L": ([3, 4, 8, 8, 8, 8, 8, 4, 3], [3, 4, 8, 8, 8, 8, 8, 4, 3]),
}


class MedNeXt(nn.Module):
  def __init__(self, cin, cout, size="S", kernel=3, base=32):
    super().__init__()
    exp, counts = MEDNEXT_SIZES[size]
    c = [base * 2**i for i in range(5)]

    def stage(width, i):
      return nn.Sequential(*[MedNeXtBlock(width, width, exp[i], kernel) for _ in range(counts[i])])

    self.stem = nn.Conv3d(cin, base, 1)
    for i in range(4):
      setattr(self, f"enc_block_{i}", stage(c[i], i))
      setattr(self, f"down_{i}", MedNeXtDown(c[i], c[i + 1], exp[i + 1], kernel))
    self.bottleneck = stage(c[4], 4)
    for level in (3, 2, 1, 0):
      index = 8 - level  # stage index of up_3 .. up_0 is 5 .. 8
      setattr(self, f"up_{level}", MedNeXtUp(c[level + 1], c[level], exp[index], kernel))
      setattr(self, f"dec_block_{level}", stage(c[level], index))
    self.out_0 = OutBlock(base, cout)
    self.dummy_tensor = nn.Parameter(torch.tensor([1.0]))

  def forward(self, x):
    x = self.stem(x)
    skips = []
    for i in range(4):
      x = getattr(self, f"enc_block_{i}")(x)
      skips.append(x)
      x = getattr(self, f"down_{i}")(x)
    x = self.bottleneck(x)
    for level in (3, 2, 1, 0):
      x = getattr(self, f"up_{level}")(x) + skips.pop()
      x = getattr(self, f"dec_block_{level}")(x)
    return self.out_0(x)


class MedNeXtWrapper(nn.Module):
  """PyTC's wrapper: the MedNeXt network as ``.model``."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, x):
    return self.model(x)


class LightningLike(nn.Module):
  """What PyTC's LightningModule contributes to the names: the network as ``.model``."""

  def __init__(self, model):
    super().__init__()
    self.model = model

  def forward(self, x):
    return self.model(x)


def randomize_norms(module: nn.Module, generator: torch.Generator) -> None:
  """GroupNorm weights ``1 + U(-.25, .25)`` and biases ``U(-.25, .25)`` (their init is 1 / 0)."""
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, nn.GroupNorm):
        m.weight.add_(torch.rand(m.weight.shape, generator=generator) * 0.5 - 0.25)
        m.bias.add_(torch.rand(m.bias.shape, generator=generator) * 0.5 - 0.25)


def save_lightning_checkpoint(path, lightning_module: nn.Module, *, global_step=0, callbacks=None):
  """``torch.save`` s a checkpoint as Lightning lays it out (``state_dict`` under its key)."""
  torch.save(
    {
      "epoch": 0,
      "global_step": global_step,
      "pytorch-lightning_version": "2.4.0",
      "state_dict": lightning_module.state_dict(),
      "loops": {},
      "callbacks": callbacks or {},
      "optimizer_states": [],
      "lr_schedulers": [],
    },
    path,
  )
