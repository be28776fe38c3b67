"""BYOL (Grill et al. 2020): online and target networks, the regression loss, optimizer param groups.

online: encoder -> projector -> predictor (trained by the loss)
target: encoder -> projector               (a copy of the online, updated only by the EMA)

One `BYOL.forward(view1, view2)` per step returns the symmetrized loss, so DDP sees one forward
per backward; the target lives in the same module with requires_grad False.
"""

from __future__ import annotations

import copy
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Sequential):
    """Projector / predictor: Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out, no bias).

    As the official code (byol/utils/networks.py: the last hk.Linear has with_bias=False). A bias
    there would be dead weight: the projector's is cancelled by the predictor's BatchNorm (zero
    gradient, a random constant copied into the target's projections); the predictor has none either.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256):
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=False),
        )


def regression_loss(p: torch.Tensor, z: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample normalized MSE 2 - 2*cos(p, z): (B, D), (B, D) -> (B,) float32, in [0, 4].

    Normalization runs in float32 even under autocast (bf16 sums of squares lose precision);
    a zero vector stays zero instead of dividing by zero (`eps` floors the norm).
    """
    p = F.normalize(p.float(), dim=-1, eps=eps)
    z = F.normalize(z.float(), dim=-1, eps=eps)
    return 2 - 2 * (p * z).sum(dim=-1)


class BYOLOutput(NamedTuple):
    loss: torch.Tensor  # scalar, with grad: mean over the batch, summed over the two directions
    cosine: torch.Tensor  # scalar, detached: mean cos(online prediction, target projection)
    collapse_std: torch.Tensor  # scalar, detached: mean per-dim std of l2-normalized projections


class BYOL(nn.Module):
    """Online encoder+projector+predictor and its target copy (encoder+projector).

    `encoder` maps (B, 3, H, W) -> (B, feature_dim). The target is a deepcopy of the online at
    construction and never receives gradients; `fastbyol.ema` moves it towards the online.

    concat_views=False (default, the official code's semantics): each view goes through each
    network in its own call, so BatchNorm statistics are per view. concat_views=True runs one call
    on torch.cat([view1, view2]): half the kernel launches, but BatchNorm statistics are computed
    over both views together, a (small) departure from the paper's setup.

    The target runs in whatever mode the module is in: in train mode it uses batch statistics, as
    the official code does (its target BN is never in inference mode during training).
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        hidden_dim: int = 4096,
        proj_dim: int = 256,
        concat_views: bool = False,
    ):
        super().__init__()
        self.concat_views = concat_views
        self.online_encoder = encoder
        self.online_projector = MLP(feature_dim, hidden_dim, proj_dim)
        self.predictor = MLP(proj_dim, hidden_dim, proj_dim)
        self.target_encoder = copy.deepcopy(self.online_encoder)
        self.target_projector = copy.deepcopy(self.online_projector)
        for p in self.target_network().parameters():
            p.requires_grad_(False)

    def online_network(self) -> nn.ModuleDict:
        """The online encoder+projector, in the same order as target_network() (for the EMA)."""
        return nn.ModuleDict({"encoder": self.online_encoder, "projector": self.online_projector})

    def target_network(self) -> nn.ModuleDict:
        """The target encoder+projector; zips with online_network() parameter for parameter."""
        return nn.ModuleDict({"encoder": self.target_encoder, "projector": self.target_projector})

    def online_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything trained by the optimizer; names as in named_parameters()."""
        for name in ("online_encoder", "online_projector", "predictor"):
            yield from getattr(self, name).named_parameters(prefix=name)

    def online_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters trained by the optimizer: online encoder, projector and predictor."""
        for _, p in self.online_named_parameters():
            yield p

    def _online(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.online_projector(self.online_encoder(x))
        return y, self.predictor(y)

    @torch.no_grad()
    def _target(self, x: torch.Tensor) -> torch.Tensor:
        return self.target_projector(self.target_encoder(x))

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> BYOLOutput:
        """Two (B, 3, H, W) views of the same B images -> BYOLOutput (loss in [0, 8]).

        loss = mean_b [2 - 2 cos(p1, z2)] + mean_b [2 - 2 cos(p2, z1)], p = online prediction,
        z = target projection. No host sync: every field is a device tensor.
        """
        if self.concat_views:
            both = torch.cat([view1, view2])
            y, p = self._online(both)
            z = self._target(both)
            (y1, y2), (p1, p2), (z1, z2) = y.chunk(2), p.chunk(2), z.chunk(2)
        else:
            (y1, p1), (y2, p2) = self._online(view1), self._online(view2)
            z1, z2 = self._target(view1), self._target(view2)
        loss = regression_loss(p1, z2).mean() + regression_loss(p2, z1).mean()
        with torch.no_grad():
            # the mean of the 2B per-sample cosines: loss/2 is their mean of 2 - 2 cos
            cosine = 1 - loss.detach() / 4
            y = F.normalize(torch.cat([y1, y2]).float(), dim=-1)
            collapse_std = y.std(dim=0).mean()  # ~1/sqrt(proj_dim) healthy, 0 when collapsed
        return BYOLOutput(loss, cosine, collapse_std)


def split_decay_params(
    named_params: Iterable[tuple[str, nn.Parameter]],
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay): conv/linear weights (ndim > 1) vs biases and BatchNorm gamma/beta."""
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.ndim > 1 else no_decay).append(p)
    return decay, no_decay


def param_groups(model: BYOL, weight_decay: float, lars: bool = True, predictor_lr_scale: float = 1.0,
                 predictor_lr_hold: bool = False) -> list[dict]:
    """Optimizer groups over the online parameters, with the paper's exclusions.

    Weights get `weight_decay` and the LARS trust ratio; biases and BatchNorm parameters get
    neither (weight_decay 0.0, lars_exclude True). Target parameters are never included.
    lars=False: no group gets the trust ratio (LARS then steps as SGD with momentum).
    predictor_lr_scale != 1 or predictor_lr_hold: the predictor's parameters get their own two
    groups, whose "lr_scale" multiplies the scheduled lr and whose "hold_lr" keeps it at its peak
    after warm-up (train_step applies both); otherwise there are just the two groups above, as in
    the paper, so existing checkpoints' optimizer states still load.
    """
    if predictor_lr_scale == 1.0 and not predictor_lr_hold:
        parts = [(model.online_named_parameters(), 1.0, False)]
    else:
        parts = [(((n, p) for n, p in model.online_named_parameters() if not n.startswith("predictor.")), 1.0, False),
                 (model.predictor.named_parameters(prefix="predictor"), predictor_lr_scale, predictor_lr_hold)]
    groups = []
    for params, scale, hold in parts:
        decay, no_decay = split_decay_params(params)
        options = {"lr_scale": scale, "hold_lr": hold}
        groups += [{"params": decay, "weight_decay": weight_decay, "lars_exclude": not lars, **options},
                   {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True, **options}]
    return groups
