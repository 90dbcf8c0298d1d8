#!/usr/bin/env python3
"""A few training steps with ccpl.CCPL, the drop-in for the original's CCPL module.

A frozen VGG-like encoder (random weights: relu1_1 .. relu4_1 widths 64, 128, 256, 512, the map
halving at each stage), the paper's projection heads (``Linear(C, C), ReLU, Linear(C, C/4)``
per layer), and a "stylised image" being optimised with the heads by Adam: the CCP loss of its
features against the content image's, at the paper's settings (relu2_1 .. relu4_1, num_s = 8,
tau = 0.07, weight 5). Prints the loss of every step.

    python examples/train_ccpl.py                  # CUDA if there is one, else the CPU
    python examples/train_ccpl.py --device cpu --size 64 --steps 3
"""

import argparse
import time

import torch
from torch import nn

import ccpl

WIDTHS = (64, 128, 256, 512)


def vgg_like_encoder():
    """relu1_1 .. relu4_1 of a VGG-shaped network (random, frozen): one feature map per stage."""
    stages, c_in = [], 3
    for i, c in enumerate(WIDTHS):
        layers = [] if i == 0 else [nn.MaxPool2d(2)]
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
        stages.append(nn.Sequential(*layers))
        c_in = c
    encoder = nn.ModuleList(stages)
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


def encode(encoder, image):
    feats = []
    for stage in encoder:
        image = stage(image)
        feats.append(image)
    return feats


def paper_mlp():
    """The original's module-level ``mlp``: three modules per encoder layer."""
    modules = []
    for c in WIDTHS:
        modules += [nn.Linear(c, c), nn.ReLU(), nn.Linear(c, c // 4)]
    return nn.ModuleList(modules)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="image side (the paper crops 256)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--num-s", type=int, default=8)
    parser.add_argument("--tau", type=float, default=0.07)
    args = parser.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    encoder = vgg_like_encoder().to(device)
    mlp = paper_mlp().to(device)
    ccp = ccpl.CCPL(mlp)  # was: net.CCPL(mlp)

    content = torch.rand(args.batch, 3, args.size, args.size, device=device)
    stylised = (content + 0.1 * torch.randn_like(content)).requires_grad_()
    optimiser = torch.optim.Adam([stylised, *mlp.parameters()], lr=1e-2)
    with torch.no_grad():
        feats_k = encode(encoder, content)

    end_layer, num_layers = 4, 3  # the original's art mode: relu2_1, relu3_1, relu4_1
    print(f"ccpl {ccpl.__version__} on {device}, kernels built: {ccpl.kernels_built()}")
    for step in range(args.steps):
        start = time.perf_counter()
        feats_q = encode(encoder, stylised)
        loss = 5.0 * ccp(feats_q, feats_k, args.num_s, end_layer - num_layers, end_layer, args.tau)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        value = loss.item()  # the step's one wait on the device
        print(f"step {step}: ccp loss {value:.5f}  ({time.perf_counter() - start:.3f} s)")


if __name__ == "__main__":
    main()
