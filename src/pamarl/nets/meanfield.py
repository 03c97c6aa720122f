"""The mean-field networks (Yang et al. 2018, MAgent experiments): one network shared by a whole team.

``obs -> [view encoder (conv) on the H x W x C view | feature MLP on the rest] -> concat with an embedding
of the mean action -> MLP -> one output per action``. On tasks without an :class:`ObsLayout` (plain feature
vectors, e.g. MPE) the encoder is an MLP on the whole observation. ``mean_dim=0`` drops the mean-action
input: the IL and AC baselines use exactly the same network otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pamarl.envs.base import ObsLayout


def _mlp(dims: Sequence[int], last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MeanFieldNet(nn.Module):
    """``f(o, mean_a) -> [.., out_dim]`` for any leading dims; parameters shared across agents."""

    def __init__(self, obs_dim: int, out_dim: int, layout: ObsLayout | None, mean_dim: int = 0,
                 conv_channels: Sequence[int] = (32, 32), embed: int = 128, mean_embed: int = 64,
                 hidden: Sequence[int] = (64,)):
        super().__init__()
        self.layout = layout
        self.obs_dim = obs_dim
        self.mean_dim = mean_dim
        if layout is not None:
            H, W, C = layout.view
            self.n_view = H * W * C
            convs: list[nn.Module] = []
            c_in, h, w = C, H, W
            for c in conv_channels:
                convs += [nn.Conv2d(c_in, c, 3), nn.ReLU()]
                c_in, h, w = c, h - 2, w - 2
            self.conv = nn.Sequential(*convs, nn.Flatten())
            rest = obs_dim - self.n_view  # features and the position
            self.view_fc = _mlp([c_in * h * w, embed], True)
            self.feat_fc = _mlp([rest, embed // 2], True) if rest > 0 else None
            enc = embed + (embed // 2 if rest > 0 else 0)
        else:
            self.n_view = 0
            self.enc = _mlp([obs_dim, embed], True)
            enc = embed
        self.mean_fc = _mlp([mean_dim, mean_embed], True) if mean_dim > 0 else None
        self.head = _mlp([enc + (mean_embed if mean_dim > 0 else 0), *hidden, out_dim], False)

    def encode(self, obs: torch.Tensor) -> torch.Tensor:
        lead = obs.shape[:-1]
        x = obs.reshape(-1, obs.shape[-1]).float()
        if self.layout is None:
            h = self.enc(x)
        else:
            H, W, C = self.layout.view
            view = x[:, : self.n_view].reshape(-1, H, W, C).permute(0, 3, 1, 2)
            h = self.view_fc(self.conv(view))
            if self.feat_fc is not None:
                h = torch.cat([h, self.feat_fc(x[:, self.n_view:])], -1)
        return h.reshape(*lead, -1)

    def forward(self, obs: torch.Tensor, mean_action: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encode(obs)
        if self.mean_fc is not None:
            if mean_action is None:
                raise ValueError("this network takes a mean action")
            h = torch.cat([h, self.mean_fc(mean_action.float())], -1)
        return self.head(h)
