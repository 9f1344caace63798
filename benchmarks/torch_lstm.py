"""The PyTorch side of the recurrent benchmark: lnjax's LN-LSTM written by hand (as PyTorch
users write it, the input projection hoisted out of the loop) and one SGD training step."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LR = 1e-3


def ln_lstm(xs, w_x, w_h, nx_s, nx_b, nh_s, nh_b, nc_s, nc_b, eps: float):
    """lnjax's LSTMCell(H) (layer norm on every term) in PyTorch: gates = LN_h(W_h h) + LN_x(W_x x),
    c = s(f) c + s(i) tanh(g), h = s(o) tanh(LN_c(c)); gate order (i, f, g, o)."""
    B, T = xs.shape[0], xs.shape[1]
    H4 = w_h.shape[1]
    Hs = H4 // 4
    u = F.layer_norm(torch.matmul(xs, w_x), [H4], nx_s, nx_b, eps)
    h = torch.zeros(B, Hs, dtype=xs.dtype)
    c = torch.zeros(B, Hs, dtype=xs.dtype)
    outs: list[torch.Tensor] = []
    for t in range(T):
        gates = u[:, t] + F.layer_norm(torch.matmul(h, w_h), [H4], nh_s, nh_b, eps)
        i, f, g, o = gates.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(F.layer_norm(c, [Hs], nc_s, nc_b, eps))
        outs.append(h)
    return torch.stack(outs, 1)


def train_step(forward, params, xs, tgt):
    """One training step; returns (loss, grads) before the update."""
    for p in params:
        p.grad = None
    loss = torch.mean((forward(xs) - tgt) ** 2)
    loss.backward()
    grads = [p.grad.clone() for p in params]
    with torch.no_grad():
        for p in params:
            p -= LR * p.grad
    return loss.detach(), grads
