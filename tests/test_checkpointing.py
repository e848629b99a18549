"""Gradient checkpointing recomputes a block in the state of its forward (frozen parameters stay frozen)."""

import torch

from distill.conditioning import Conditioning
from losses.common import frozen
from teachers.wan import WanDenoiser


def test_a_network_frozen_in_forward_backpropagates_to_its_input_with_checkpointing():
    """DMD2's GAN generator term: gradient through the critic to the sample, none into the critic."""
    net = WanDenoiser.load("tiny-random")
    x = torch.randn(2, 3, 2, 8, 8, requires_grad=True)
    t, cond = torch.rand(2), Conditioning(torch.randn(2, 5, 384))
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            net.enable_gradient_checkpointing()
        x.grad = None
        with frozen(net):
            out = net.features(x, t, cond)
        out.square().mean().backward()
        assert all(p.grad is None for p in net.parameters()) and all(p.requires_grad for p in net.parameters())
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
