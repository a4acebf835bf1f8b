"""Conservation laws of feedback alignment and its relatives (METHOD section 9).

Network: ``h_l = W_l a_{l-1} + c_l``, ``a_l = f(h_l)``. Neuron k of layer l has incoming weights
``w_k = W_l[k, :]`` (bias ``c_l[k]`` appended as one more incoming weight), outgoing weights
``v_k = W_{l+1}[:, k]`` and feedback ``b_k = B_{l+1}[:, k]`` (B has W_{l+1}'s shape; the error sent
down is ``delta_{l+1} @ B_{l+1}``). When ``f`` is positively homogeneous (``f(h) = f'(h) h``:
relu, leaky relu, identity) and the path from layer l to layer l+1 only pools, flattens or drops
out (``g(a) = g'(a) a``), gradient flow on any loss gives

    d/dt 0.5 |w_k|^2 = -sum_n (delta_{l+1} B_{l+1})_{nk} a_{nk} = d/dt C_k

with the coupling ``C_k`` of the rule of layer l+1, so that

    Q_k = 0.5 |w_k|^2 - C_k   is constant, with
    fa, learned, kp, wm   C_k = <b_k, v_k>               (B fixed; kp / wm move B: see below)
    usf                   C_k = c |v_k|_1                (B = c sign(W_{l+1}))
    frsf                  C_k = <|m_k|, |v_k|>           (B = |M| sign(W_{l+1}), M fixed)
    bp                    C_k = 0.5 |v_k|^2              (balancedness)

Summed over a layer (``layer_quantity``): ``0.5 |W_l|_F^2 (+ 0.5 |c_l|^2) - sum_k C_k``.

Convolutions: neuron k is output channel k, ``w_k = W_l[k]`` flattened, ``v_k`` the slice of
W_{l+1} that reads channel k (conv: ``W_{l+1}[:, k]``, any groups; linear after a flatten: the
columns of channel k). No law, so the pair is left out with a reason: dfa (the error does not go
through W_{l+1}'s feedback), brsf (|M| redrawn at every step), a batch norm or another
non-homogeneous op (tanh, softmax, addition of a residual branch) between the two layers, a layer
whose output feeds more than one module. kp and wm change B, so their Q_k uses the current B and is
conserved only while B stays put. Weight decay breaks every law; momentum keeps it only in the
gradient-flow limit (lr -> 0); the trainer's feedback decay shrinks B and breaks the fa law.

Drift (``drift``): per layer ``max_k |Q_k(t) - Q_k(0)| / mean_k (|0.5 |w_k(0)|^2| + |C_k(0)|)``.
The denominator is the size of the two terms that Q_k balances, not ``mean_k |Q_k(0)|``, which can
be near zero (bp from a balanced start) and would turn numerical noise into a large "drift".
With a discrete step of size lr the drift grows in proportion to lr.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from spikealign.errors import UserError
from spikealign.feedback import FeedbackConv2d, FeedbackLinear

_FEEDBACK_LAYERS = (FeedbackLinear, FeedbackConv2d)

__all__ = [
    "LAW_RULES",
    "DriftTracker",
    "LayerPair",
    "Quantities",
    "conserved_quantities",
    "coupling",
    "drift",
    "incoming",
    "layer_pairs",
    "layer_quantity",
    "outgoing",
]

#: Rules of the upper layer with a conservation law, and the coupling term each uses.
LAW_RULES = {
    "bp": "0.5 |v_k|^2",
    "fa": "<b_k, v_k>",
    "learned": "<b_k, v_k>",
    "kp": "<b_k, v_k> (current B)",
    "wm": "<b_k, v_k> (current B)",
    "usf": "c |v_k|_1",
    "frsf": "<|m_k|, |v_k|>",
}
LAST_LAYER = "last weight layer: no layer above it"
_NO_LAW = {
    "dfa": "dfa sends the output error, not delta_{l+1} B_{l+1}, so no law ties it to W_{l+1}",
    "brsf": "brsf redraws |M| at every step, so no fixed quantity ties B to W_{l+1}",
}

# Modules and functions that keep the law between two layers: positively homogeneous and
# acting on each channel separately (g(a) = g'(a) a).
_PASS_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Identity,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Dropout,
    nn.Dropout2d,
)
_PASS_FUNCTIONS = {
    F.relu, torch.relu, F.leaky_relu, torch.flatten, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, torch.nn.functional.dropout2d,
}  # fmt: skip
_PASS_METHODS = {"relu", "flatten", "view", "reshape", "contiguous"}
_RESHAPES = {torch.flatten, "flatten", "view", "reshape"}


@dataclass(frozen=True)
class LayerPair:
    """Two consecutive weight layers: ``lower`` feeds ``upper`` through homogeneous ops only."""

    lower: str
    upper: str
    flattened: bool  # a conv's channels are flattened into the upper linear layer's inputs


class Quantities(dict):
    """{lower layer name: Q_k per neuron} plus the two terms and the pairs left out.

    ``incoming[name]`` = 0.5 |w_k|^2 (bias included), ``coupling[name]`` = C_k, so
    ``self[name] == incoming[name] - coupling[name]``; ``skipped`` = {layer name: reason}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.incoming: dict[str, Tensor] = {}
        self.coupling: dict[str, Tensor] = {}
        self.skipped: dict[str, str] = {}
        self.rules: dict[str, str] = {}  # lower layer name -> rule of the upper layer


def _is_weight_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d))


class _LayerTracer(fx.Tracer):
    """torch.fx tracer that keeps Linear / Conv2d / feedback layers as opaque calls."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if _is_weight_layer(module) or isinstance(module, _FEEDBACK_LAYERS):
            return True
        return super().is_leaf_module(module, qualified_name)


def _rule_of(module: nn.Module) -> str:
    return module.rule if isinstance(module, _FEEDBACK_LAYERS) else "bp"


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} '{node.target}'"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return "the model output" if node.op == "output" else str(node.target)


def _passes(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _PASS_MODULES)
    if node.op == "call_function":
        return node.target in _PASS_FUNCTIONS
    return node.op == "call_method" and node.target in _PASS_METHODS


@dataclass
class _Scan:
    pairs: list[LayerPair] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def layer_pairs(model: nn.Module) -> tuple[list[LayerPair], dict[str, str]]:
    """The consecutive (lower, upper) weight-layer pairs of ``model`` that have a law.

    Found by tracing ``model`` with torch.fx; returns (pairs, {layer name: why it has no pair}).
    A model torch.fx cannot trace gives no pairs and one reason per weight layer.
    """
    weight_layers = [name for name, m in model.named_modules() if _is_weight_layer(m)]
    try:
        graph = _LayerTracer().trace(model)
    except Exception as err:  # fx raises many kinds on dynamic control flow
        reason = (
            f"torch.fx cannot trace the model ({type(err).__name__}), so layers cannot be paired"
        )
        return [], dict.fromkeys(weight_layers, reason)
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and _is_weight_layer(modules[node.target]):
            calls.setdefault(node.target, []).append(node)
    scan = _Scan()
    for name in weight_layers:
        nodes = calls.get(name, [])
        if len(nodes) != 1:
            scan.skipped[name] = (
                "not called in the traced forward" if not nodes else "called more than once"
            )
            continue
        _follow(name, nodes[0], modules, scan)
    return scan.pairs, scan.skipped


def _follow(name: str, node: fx.Node, modules: dict[str, nn.Module], scan: _Scan) -> None:
    """Walk from layer ``name``'s output to the next weight layer through homogeneous ops."""
    lower = modules[name]
    flattened = False
    while True:
        users = list(node.users)
        if len(users) != 1:
            scan.skipped[name] = (
                f"its output feeds {len(users)} operations (a branch or residual), so neuron "
                "k has no single outgoing weight vector"
                if users
                else "its output is not used"
            )
            return
        (node,) = users
        if node.op == "output":
            scan.skipped[name] = LAST_LAYER
            return
        if node.op == "call_module" and _is_weight_layer(modules[node.target]):
            break
        if not _passes(node, modules):
            what = _describe(node, modules)
            if node.op == "call_module" and isinstance(
                modules[node.target], nn.modules.batchnorm._NormBase
            ):
                scan.skipped[name] = (
                    f"batch norm {what} between it and the next layer breaks the law"
                )
            else:
                scan.skipped[name] = (
                    f"{what} between it and the next layer is not positively homogeneous "
                    "(the law allows relu, leaky relu, pooling, dropout and flatten only)"
                )
            return
        if node.target in _RESHAPES or (
            node.op == "call_module" and isinstance(modules[node.target], nn.Flatten)
        ):
            flattened = True
    upper_name = node.target
    upper = modules[upper_name]
    rule = _rule_of(upper)
    if rule in _NO_LAW:
        scan.skipped[name] = f"the layer above ('{upper_name}') uses {rule}: {_NO_LAW[rule]}"
        return
    if rule not in LAW_RULES:
        scan.skipped[name] = f"the layer above ('{upper_name}') uses rule {rule}, which has no law"
        return
    if isinstance(upper, _FEEDBACK_LAYERS) and upper.feedback.shape != upper.weight.shape:
        scan.skipped[name] = f"the feedback of '{upper_name}' is not weight-shaped"
        return
    channels = lower.out_features if isinstance(lower, nn.Linear) else lower.out_channels
    if isinstance(upper, nn.Conv2d):
        fits = isinstance(lower, nn.Conv2d) and not flattened and upper.in_channels == channels
    elif isinstance(lower, nn.Conv2d):
        fits = flattened and upper.in_features % channels == 0
    else:
        fits = upper.in_features == channels and not flattened
    if not fits:
        scan.skipped[name] = (
            f"its {channels} outputs do not map channel by channel onto the inputs of "
            f"'{upper_name}' ({type(lower).__name__} -> {type(upper).__name__})"
        )
        return
    scan.pairs.append(LayerPair(name, upper_name, flattened and isinstance(upper, nn.Linear)))


# --------------------------------------------------------------------------------------------
# The terms of Q_k, on plain tensors (also used by batched trainers)
# --------------------------------------------------------------------------------------------


def incoming(weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """0.5 |w_k|^2 per output neuron / channel k, the bias counted as one more weight."""
    squares = weight.detach().reshape(weight.shape[0], -1).pow(2).sum(1)
    if bias is not None:
        squares = squares + bias.detach().pow(2)
    return 0.5 * squares


def outgoing(upper_weight: Tensor, channels: int, groups: int = 1) -> Tensor:
    """Row k = v_k: everything of ``upper_weight`` that reads lower neuron / channel k.

    Linear (out, channels * S) after a flatten of ``channels`` channels of S positions each (S = 1:
    linear after linear); Conv2d (out, channels / groups, kh, kw) with ``groups``.
    """
    upper_weight = upper_weight.detach()
    out = upper_weight.shape[0]
    if upper_weight.dim() == 4:
        per_group_in = upper_weight.shape[1]
        blocks = upper_weight.reshape(groups, out // groups, per_group_in, -1)
        return blocks.permute(0, 2, 1, 3).reshape(groups * per_group_in, -1)
    return upper_weight.reshape(out, channels, -1).permute(1, 0, 2).reshape(channels, -1)


def coupling(rule: str, upper: nn.Module, channels: int) -> Tensor:
    """C_k of ``rule`` for the layer ``upper`` above ``channels`` neurons (see module docstring)."""
    groups = getattr(upper, "groups", 1)
    v = outgoing(upper.weight, channels, groups)
    if rule == "bp":
        return 0.5 * v.pow(2).sum(1)
    if rule in ("fa", "learned", "kp", "wm"):
        return (outgoing(upper.feedback, channels, groups) * v).sum(1)
    if rule == "usf":
        return upper.feedback_magnitude.detach() * v.abs().sum(1)
    if rule == "frsf":
        magnitude = outgoing(upper.feedback_magnitude, channels, groups).abs()
        return (magnitude * v.abs()).sum(1)
    raise UserError(f"rule {rule!r} has no conservation law; laws exist for {', '.join(LAW_RULES)}")


# --------------------------------------------------------------------------------------------
# The public measures
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def conserved_quantities(
    model: nn.Module, pairs: tuple[list[LayerPair], dict[str, str]] | None = None
) -> Quantities:
    """Q_k per neuron for every pair of consecutive layers of ``model`` with a law.

    Keyed by the lower layer's qualified module name; values are float64 CPU tensors, one entry
    per neuron (output channel for convolutions). ``result.skipped`` names every weight layer left
    out and why. ``pairs`` (the result of :func:`layer_pairs`) saves the tracing when the same
    model is measured repeatedly.
    """
    found, skipped = layer_pairs(model) if pairs is None else pairs
    modules = dict(model.named_modules())
    result = Quantities()
    result.skipped = dict(skipped)
    for pair in found:
        lower, upper = modules[pair.lower], modules[pair.upper]
        rule = _rule_of(upper)
        channels = lower.weight.shape[0]
        a = incoming(lower.weight, lower.bias).double().cpu()
        c = coupling(rule, upper, channels).double().cpu()
        result.incoming[pair.lower], result.coupling[pair.lower] = a, c
        result[pair.lower] = a - c
        result.rules[pair.lower] = rule
    return result


def layer_quantity(quantities: dict[str, Tensor]) -> dict[str, float]:
    """The layer sums sum_k Q_k (= 0.5 |W_l|_F^2 - <B_{l+1}, W_{l+1}>_F under fa)."""
    return {name: float(values.sum()) for name, values in quantities.items()}


def drift(q_start: dict[str, Tensor], q_now: dict[str, Tensor]) -> dict[str, float]:
    """Relative drift per layer: max_k |Q_k(t) - Q_k(0)| / scale, scale from ``q_start``.

    scale = mean_k (|0.5 |w_k(0)|^2| + |C_k(0)|) when ``q_start`` is a :class:`Quantities` (see the
    module docstring), else mean_k |Q_k(0)|. Layers missing from either side are left out.
    """
    result = {}
    for name, start in q_start.items():
        if name not in q_now:
            continue
        start = start.double()
        if isinstance(q_start, Quantities) and name in q_start.incoming:
            scale = (q_start.incoming[name].abs() + q_start.coupling[name].abs()).mean()
        else:
            scale = start.abs().mean()
        change = (q_now[name].double().to(start.device) - start).abs().max()
        if scale > 0:
            result[name] = float(change / scale)
        else:
            result[name] = math.inf if change > 0 else 0.0
    return result


class DriftTracker:
    """Drift of a model's conserved quantities since the tracker was made (trainer metrics).

    ``row()`` gives ``{"drift_<layer>": drift}`` for every pair with a law; the layers left out
    are named once in a warning. ``state_dict`` / ``load_state_dict`` keep Q_k(0) across a resume.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.pairs = layer_pairs(model)
        self.start = conserved_quantities(model, self.pairs)
        left_out = {k: v for k, v in self.start.skipped.items() if v != LAST_LAYER}
        if left_out:
            reasons = "; ".join(f"{name}: {why}" for name, why in left_out.items())
            warnings.warn(f"conservation: layers without a tracked law: {reasons}", stacklevel=2)

    def row(self) -> dict[str, float]:
        now = conserved_quantities(self.model, self.pairs)
        return {f"drift_{name}": value for name, value in drift(self.start, now).items()}

    def state_dict(self) -> dict:
        return {
            "quantities": dict(self.start),
            "incoming": dict(self.start.incoming),
            "coupling": dict(self.start.coupling),
        }

    def load_state_dict(self, state: dict) -> None:
        start = Quantities()
        start.update(state["quantities"])
        start.incoming.update(state["incoming"])
        start.coupling.update(state["coupling"])
        start.skipped, start.rules = self.start.skipped, self.start.rules
        self.start = start
