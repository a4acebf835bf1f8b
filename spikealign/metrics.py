"""How well feedback weights align with forward weights (METHOD section 7).

For a forward weight W and feedback B of the same shape, flattened to vectors w and b:

    angle_deg      = angle between w and b in degrees, computed as 2 atan2(|u - v|, |u + v|)
                     with u = w/|w|, v = b/|b| (accurate near 0 and 180, unlike arccos)
    sign_agreement = 100 * #{i : b_i != 0 and sign(b_i) = sign(w_i)} / #{i : b_i != 0}
    norm_ratio     = |b| / |w|   (Frobenius norms)

A zero matrix has no direction: its angle is nan; with no non-zero feedback entry the sign
agreement is nan. ``update_angle`` compares the weight update of each layer's rule with the
backprop gradient on the same batch.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from spikealign.errors import UserError
from spikealign.feedback import convert, feedback_layers

__all__ = ["alignment", "model_alignment", "update_angle"]


def _flat_float64(matrix, device=None) -> Tensor:
    """float64 copy, flattened; a tensor stays on its device (or goes to ``device``)."""
    if isinstance(matrix, Tensor):
        return matrix.detach().flatten().to(device or matrix.device, torch.float64)
    return torch.as_tensor(np.asarray(matrix, dtype=np.float64), device=device).flatten()


def _angle_deg(a: Tensor, b: Tensor) -> float:
    norm_a, norm_b = a.norm(), b.norm()
    if norm_a == 0 or norm_b == 0:
        return math.nan
    u, v = a / norm_a, b / norm_b
    return math.degrees(2.0 * math.atan2((u - v).norm().item(), (u + v).norm().item()))


def alignment(weight, feedback) -> dict[str, float]:
    """{"angle_deg", "sign_agreement" (percent), "norm_ratio"} between weight and feedback.

    Accepts torch tensors or numpy arrays of the same shape. Computed in float64 on the weight's
    device, with one device-to-host copy (ResNet/AlexNet layers have millions of entries).
    """
    weight_shape, feedback_shape = tuple(np.shape(weight)), tuple(np.shape(feedback))
    if weight_shape != feedback_shape:
        raise UserError(
            f"alignment: weight has shape {weight_shape} but feedback has shape {feedback_shape}; "
            "pass matrices of the same shape"
        )
    w = _flat_float64(weight)
    b = _flat_float64(feedback, w.device)
    nonzero = b != 0
    count = nonzero.sum()
    agree = (nonzero & (torch.sign(b) == torch.sign(w))).sum()
    norm_w, norm_b = torch.linalg.vector_norm(w), torch.linalg.vector_norm(b)
    u = w / norm_w
    v = b / norm_b  # not in place: b may be the caller's own float64 tensor
    difference = torch.dist(u, v)
    total = torch.linalg.vector_norm(u.add_(v))
    scalars = torch.stack([count.double(), agree.double(), norm_w, norm_b, difference, total])
    count, agree, norm_w, norm_b, difference, total = scalars.tolist()
    defined = norm_w > 0 and norm_b > 0
    return {
        "angle_deg": math.degrees(2.0 * math.atan2(difference, total)) if defined else math.nan,
        "sign_agreement": 100.0 * agree / count if count else math.nan,
        "norm_ratio": norm_b / norm_w if norm_w else math.nan,
    }


def model_alignment(model: nn.Module) -> dict[str, dict[str, float]]:
    """{layer name: alignment(weight, feedback)} for every feedback layer of ``model``.

    Layers whose feedback is not weight-shaped are skipped: dfa's hidden layers, whose B_l maps
    the output error (n_outputs x input features). dfa's output layer is kept: its B_L has the
    weight's shape and plays the role of fa's feedback (its delta is the output error).
    """
    return {
        name: alignment(layer.weight, layer.feedback)
        for name, layer in feedback_layers(model)
        if layer.feedback.shape == layer.weight.shape
    }


def _rng_states(devices: list[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_states(states, devices: list[int]) -> None:
    cpu_state, cuda_states = states
    torch.set_rng_state(cpu_state)
    for device, state in zip(devices, cuda_states, strict=True):
        torch.cuda.set_rng_state(state, device)


def _weight_grads(model, names, loss_fn, inputs, targets) -> list[Tensor | None]:
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in names]
    loss = loss_fn(model(inputs), targets)
    return list(torch.autograd.grad(loss, weights, allow_unused=True))


def update_angle(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, targets: Tensor
) -> dict[str, float]:
    """{layer name: angle in degrees between the rule's weight gradient and backprop's}.

    Both gradients are computed on copies of ``model`` (same mode, same random state, so dropout
    masks match), so the model's grads, batch-norm statistics, feedback and the global RNG are left
    as they were. A layer without gradient on this batch gives nan.
    """
    names = [name for name, _ in feedback_layers(model)]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        start = _rng_states(devices)
        rule_grads = _weight_grads(copy.deepcopy(model), names, loss_fn, inputs, targets)
        _set_rng_states(start, devices)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # convert already warned about the original model
            backprop_model = convert(copy.deepcopy(model), "bp")
        bp_grads = _weight_grads(backprop_model, names, loss_fn, inputs, targets)
    return {
        name: math.nan
        if rule is None or bp is None
        else _angle_deg(rule.detach().double().flatten(), bp.detach().double().flatten())
        for name, rule, bp in zip(names, rule_grads, bp_grads, strict=True)
    }
