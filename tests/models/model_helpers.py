"""Helpers shared by the model tests: non-trivial weights, relative errors, gradients."""

import torch

TINY = dict(patch_size=4, embed_dim=16, num_heads=(2, 2, 4, 4), num_classes=5, drop_path_rate=0.0)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial weights: the zero-initialised post-norms, q/v biases and logit scales (some above the
    log(100) clamp) get random values, so every term of the attention and every branch matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g, dtype=p.dtype) * 5 + 1)
            elif "norm" in name or "q_bias" in name or "v_bias" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5 + ("weight" in name))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def forward_backward(model, x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output, and the gradient of a random projection of it w.r.t. the input (parameter grads accumulate)."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * w).sum().backward()
    return y.detach(), x.grad
