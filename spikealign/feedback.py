"""Learning rules without weight transport, as PyTorch layers.

A converted layer computes the ordinary forward map, ``y = x W^T + b`` (Linear) or
``y = conv2d(x, W) + b`` (Conv2d), and the ordinary weight and bias gradients

    dL/dW = delta^T x           (conv: torch.nn.grad.conv2d_weight(x, W.shape, delta))
    dL/db = sum of delta

with ``delta = dL/dy``, but it sends the error to the layer below through a separate feedback
tensor B of the weight's shape instead of W itself:

    dL/dx := delta @ B          (conv: torch.nn.grad.conv2d_input(x.shape, B, delta))

Rules differ only in how B is made (one small strategy class per rule, see ``RULES``):

    bp       B = W                                  (exact backprop, the reference)
    fa       B ~ U(-s, s) fixed                     (feedback alignment; s = 1/sqrt(fan_in))
    usf      B = s * sign(W)                        (s = RMS of W at conversion: |B| = |W|)
    frsf     B = |M| * sign(W), M ~ U(-s, s) fixed
    brsf     B = |M| * sign(W), M ~ U(-s, s) redrawn at every backward pass
    dfa      dL/dx := e @ B_l, e = dL/d(network output), B_l ~ U(-s, s), s = 1/sqrt(n_outputs)
    wm       weight mirror:  B <- (1 - lr wd) B + lr (y^T xi) / n,  xi ~ N(0, sigma^2), y = W xi
    kp       Kolen-Pollack:  B <- (1 - lr wd) B - lr dL/dW
    learned  B set from outside with ``layer.set_feedback`` (e.g. by the spiking RDD phase)

``s = 1/sqrt(fan_in)`` is the bound of PyTorch's default (Kaiming-uniform) init of the weight;
every rule that draws accepts ``feedback_scale`` to change it. Random draws use torch's global
RNG (``torch.manual_seed`` reproduces them) or the ``generator`` option. Initial draws are made on
the generator's device (CPU by default) and then moved, so a seed gives the same feedback on every
device.

Exactly one autograd Function per layer kind (``LinearFeedbackFunction``,
``Conv2dFeedbackFunction``) serves every rule. It takes the feedback tensor plus two optional
rule hooks: ``refresh`` (called once at the start of backward and returning the feedback to use:
bp copies W, the sign rules write sign(W) * magnitude into the buffer in place) and
``output_error`` (dfa: the network's output error replaces the layer's own delta). ``.feedback``
always holds the tensor used by the last backward pass.

Mixed precision: under ``torch.autocast`` (CPU or CUDA) both Functions compute as autocast computes
``F.linear``/``F.conv2d``: input, weight and bias are cast to the autocast dtype (float64 operands
are left alone, as autocast leaves them), the cast input is saved for backward, and backward uses
the feedback cast to that dtype; the weight and bias gradients are returned in the parameters' own
dtype (float32), as autograd's cast would return them. Backward needs no autocast state of its
own. channels_last tensors pass through unchanged (``convolution_backward`` takes any layout);
feedback drawn at conversion keeps the weight's memory format.

dfa ordering argument: ``convert`` registers a forward pre-hook on the model (opens a fresh
``_OutputError`` slot that the dfa layers running in this forward capture) and a forward hook that
attaches a tensor hook to the model's output. Autograd runs that tensor hook when the gradient of
the output is ready, i.e. before the output's grad_fn runs; every converted layer is upstream of
that grad_fn, so e is stored before any layer's backward reads it.

``xiao2019_feedback(model)`` replaces the usf, fa and frsf feedback of a converted model by the
scales of Xiao et al. (2019)'s code (METHOD 8; see its docstring).

``step_feedback(model)`` (call after every optimiser step) applies the wm and kp updates with the
hyperparameters given to ``convert``; brsf redraws M inside every backward pass by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.utils import _pair

from spikealign.errors import UserError

__all__ = [
    "RULES",
    "Conv2dFeedbackFunction",
    "FeedbackConv2d",
    "FeedbackLinear",
    "FeedbackRule",
    "LinearFeedbackFunction",
    "convert",
    "feedback_layers",
    "make_rule",
    "step_feedback",
    "xiao2019_feedback",
]


# --------------------------------------------------------------------------------------------
# The network's output error (dfa)
# --------------------------------------------------------------------------------------------


class _OutputError:
    """dL/d(output) of one forward pass of the converted model, filled by a tensor hook."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: Tensor | None = None

    def capture(self, grad: Tensor) -> None:
        self.error = grad


class _OutputErrorChannel:
    """Hands each forward pass's output-error slot from the model's hooks to its dfa layers.

    The hooks are bound methods of this object, so ``copy.deepcopy(model)`` copies channel,
    hooks and the dfa rules that reference it consistently.
    """

    def __init__(self) -> None:
        self.current: _OutputError | None = None
        self.handles: list[Any] = []

    def open(self, module: nn.Module, args: Any) -> None:
        self.current = _OutputError()

    def close(self, module: nn.Module, args: Any, output: Any) -> None:
        slot, self.current = self.current, None
        if slot is None or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor):
            raise UserError(
                f"dfa needs a model whose forward returns one tensor, got {type(output).__name__}; "
                "convert the submodule that produces the output tensor instead"
            )
        if output.requires_grad:
            output.register_hook(slot.capture)

    def attach(self, model: nn.Module) -> None:
        self.handles = [
            model.register_forward_pre_hook(self.open),
            model.register_forward_hook(self.close),
        ]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


# --------------------------------------------------------------------------------------------
# The two autograd Functions shared by every rule
# --------------------------------------------------------------------------------------------

Refresh = Callable[[], Tensor]


def _autocast_dtype(input: Tensor) -> torch.dtype | None:
    """The dtype autocast gives linear/conv2d operands on ``input``'s device; None when off."""
    device_type = input.device.type
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _cast(tensor: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """``tensor`` in ``dtype`` as autocast casts an operand: floating point except float64."""
    if tensor is None or dtype is None or tensor.dtype in (dtype, torch.float64):
        return tensor
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _feedback_in(feedback: Tensor, dtype: torch.dtype) -> Tensor:
    """``feedback`` in ``dtype`` (autocast's compute dtype). The cast is kept on the tensor and
    reused while the feedback is unchanged (same version counter: every in-place update, refresh,
    set_feedback or broadcast bumps it), so fixed feedback (fa, learned) is cast once, not once
    per step."""
    if feedback.dtype == dtype:
        return feedback
    cached = getattr(feedback, "_spikealign_cast", None)
    if cached is not None and cached[0] == feedback._version and cached[1].dtype == dtype:
        return cached[1]
    cast = feedback.to(dtype)
    feedback._spikealign_cast = (feedback._version, cast)
    return cast


def _project_output_error(
    output_error: _OutputError, feedback: Tensor, input_shape, dtype: torch.dtype
) -> Tensor:
    """dfa: dL/dx := e @ B_l, reshaped to the layer input's shape, in ``dtype``."""
    error = output_error.error
    if error.shape[0] != input_shape[0]:
        raise UserError(
            f"dfa: the model output has batch size {error.shape[0]} but a layer input has "
            f"{input_shape[0]}; dfa needs layers whose inputs keep the batch dimension first"
        )
    projected = error.reshape(error.shape[0], -1).to(feedback.dtype).mm(feedback)
    return projected.view(input_shape).to(dtype)


class LinearFeedbackFunction(torch.autograd.Function):
    """y = x W^T + b; backward: dx = delta @ feedback, dW = delta^T x, db = sum(delta).

    Arguments: (input, weight, bias, feedback, refresh=None, output_error=None). ``refresh``, if
    given, is called at the start of backward and returns the feedback to use; ``output_error``
    (dfa) replaces delta by the network's output error e, with feedback of shape
    (e's features, input's features per sample).
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        refresh: Refresh | None = None,
        output_error: _OutputError | None = None,
    ) -> Tensor:
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        compute_dtype = _autocast_dtype(input)
        input, weight, bias = (_cast(t, compute_dtype) for t in (input, weight, bias))
        ctx.save_for_backward(input)
        # feedback is not saved with save_for_backward: rules rewrite it in place in backward
        ctx.feedback, ctx.refresh, ctx.output_error = feedback, refresh, output_error
        ctx.has_bias = bias is not None
        return F.linear(input, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (input,) = ctx.saved_tensors
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        feedback = ctx.refresh() if ctx.refresh is not None else ctx.feedback
        grad_output = grad_output.to(input.dtype)  # the output's dtype is the compute dtype
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.output_error is not None:
                grad_input = _project_output_error(
                    ctx.output_error, feedback, input.shape, input_dtype
                )
            else:
                grad_input = grad_output.matmul(_feedback_in(feedback, input.dtype))
                grad_input = grad_input.to(input_dtype)
        delta = grad_output.reshape(-1, grad_output.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_weight = delta.t().mm(input.reshape(-1, input.shape[-1])).to(weight_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = delta.sum(0).to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


def _same_padding(weight_shape, dilation) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of padding='same', as nn.Conv2d computes it."""
    pads = []
    for kernel, dil in zip(reversed(weight_shape[2:]), reversed(dilation), strict=True):
        total = dil * (kernel - 1)
        pads += [total // 2, total - total // 2]
    return tuple(pads)


class Conv2dFeedbackFunction(torch.autograd.Function):
    """y = conv2d(x, W) + b; backward: dx = conv2d_input(x.shape, feedback, delta), ordinary dW, db.

    Arguments: (input, weight, bias, feedback, stride, padding, dilation, groups, refresh=None,
    output_error=None); padding is an int pair, 'valid' or 'same' (zero padding; other padding
    modes are applied by FeedbackConv2d with F.pad before this function, as nn.Conv2d does).
    ``refresh`` and ``output_error`` as in LinearFeedbackFunction.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        feedback: Tensor,
        stride,
        padding,
        dilation,
        groups: int,
        refresh: Refresh | None = None,
        output_error: _OutputError | None = None,
    ) -> Tensor:
        ctx.dtypes = (input.dtype, weight.dtype, None if bias is None else bias.dtype)
        compute_dtype = _autocast_dtype(input)
        input, weight, bias = (_cast(t, compute_dtype) for t in (input, weight, bias))
        stride, dilation = _pair(stride), _pair(dilation)
        input_shape = input.shape
        pad_amounts = None
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            left, right, top, bottom = _same_padding(weight.shape, dilation)
            if (left, top) == (right, bottom):
                padding = (top, left)
            else:  # asymmetric (even kernel): pad explicitly, crop the input gradient in backward
                pad_amounts = (left, right, top, bottom)
                input = F.pad(input, pad_amounts)
                padding = (0, 0)
        else:
            padding = _pair(padding)
        ctx.save_for_backward(input)
        ctx.feedback, ctx.refresh, ctx.output_error = feedback, refresh, output_error
        ctx.conv_args = (stride, padding, dilation, groups)
        ctx.input_shape, ctx.pad_amounts, ctx.weight_shape = input_shape, pad_amounts, weight.shape
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        (input,) = ctx.saved_tensors
        input_dtype, weight_dtype, bias_dtype = ctx.dtypes
        stride, padding, dilation, groups = ctx.conv_args
        feedback = ctx.refresh() if ctx.refresh is not None else ctx.feedback
        grad_output = grad_output.to(input.dtype)  # the output's dtype is the compute dtype
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        needs_bias = needs_bias and ctx.bias_sizes is not None
        if ctx.output_error is None:
            # one fused call, as autograd's own conv backward: dx from feedback, dW from (x, delta)
            grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward.default(
                grad_output,
                input,
                _feedback_in(feedback, input.dtype),
                ctx.bias_sizes,
                stride,
                padding,
                dilation,
                False,
                [0, 0],
                groups,
                (needs_input, needs_weight, needs_bias),
            )
            if needs_input and ctx.pad_amounts is not None:
                left, _, top, _ = ctx.pad_amounts
                height, width = ctx.input_shape[2:]
                grad_input = grad_input[:, :, top : top + height, left : left + width]
        else:
            grad_input = grad_weight = grad_bias = None
            if needs_input:
                grad_input = _project_output_error(
                    ctx.output_error, feedback, ctx.input_shape, input_dtype
                )
            if needs_weight:
                grad_weight = torch.nn.grad.conv2d_weight(
                    input, ctx.weight_shape, grad_output, stride, padding, dilation, groups
                )
            if needs_bias:
                grad_bias = grad_output.sum((0, 2, 3))
        grad_input = None if grad_input is None else grad_input.to(input_dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight_dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# Rules: how the feedback tensor is made
# --------------------------------------------------------------------------------------------


def _default_bound(weight: Tensor) -> float:
    """Bound of nn.Linear/nn.Conv2d's default Kaiming-uniform init: 1/sqrt(fan_in)."""
    fan_in = weight[0].numel()
    return 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0


def _check_generator_device(rule: FeedbackRule, layer, generator) -> None:
    """Per-step draws (brsf, wm) happen on the layer's device, so their generator must be there."""
    if generator is not None and generator.device != layer.weight.device:
        raise UserError(
            f"rule '{rule.name}' draws on {layer.weight.device} at every step but its generator "
            f"is on {generator.device}; pass torch.Generator(device='{layer.weight.device}')"
        )


def _uniform(shape, low: float, high: float, like: Tensor, generator) -> Tensor:
    """U(low, high) drawn on the generator's device (CPU by default), moved to ``like``'s device.

    A draw of ``like``'s shape also takes its memory format (a channels_last weight gets
    channels_last feedback, so backward reads both in one layout).
    """
    device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.empty(shape, dtype=like.dtype, device=device)
    draw.uniform_(low, high, generator=generator)
    if tuple(shape) == tuple(like.shape):
        return torch.empty_like(like, requires_grad=False).copy_(draw)
    return draw.to(like.device)


@dataclass
class FeedbackRule:
    """Strategy: how one rule makes a layer's feedback. Fields are the rule's options."""

    name: ClassVar[str] = ""
    #: True where ``set_feedback`` makes sense (the feedback is weight-shaped state of its own)
    stored_feedback: ClassVar[bool] = True

    def init(self, layer: _FeedbackLayer) -> None:
        """Register ``layer.feedback`` (and any extra buffer) with its initial value."""
        raise NotImplementedError

    def backward_hooks(self, layer: _FeedbackLayer, input: Tensor):
        """(refresh, output_error) for the autograd Function; fixed feedback needs neither."""
        return None, None

    def step(self, layer: _FeedbackLayer) -> None:
        """Update after an optimiser step (``step_feedback``); most rules have none."""


@dataclass
class Backprop(FeedbackRule):
    """bp: B = W, copied into ``.feedback`` at every backward pass."""

    name: ClassVar[str] = "bp"
    stored_feedback: ClassVar[bool] = False

    def init(self, layer):
        layer.register_buffer("feedback", layer.weight.detach().clone())

    def backward_hooks(self, layer, input):
        return functools.partial(self.refresh, layer), None

    @staticmethod
    @torch.no_grad()
    def refresh(layer) -> Tensor:
        return layer.feedback.copy_(layer.weight)


@dataclass
class FeedbackAlignment(FeedbackRule):
    """fa: B ~ U(-s, s), fixed; s = feedback_scale or 1/sqrt(fan_in) (the weight's init bound)."""

    name: ClassVar[str] = "fa"
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        bound = _default_bound(layer.weight) if self.feedback_scale is None else self.feedback_scale
        feedback = _uniform(layer.weight.shape, -bound, bound, layer.weight, self.generator)
        layer.register_buffer("feedback", feedback)


@dataclass
class _SignSymmetry(FeedbackRule):
    """B = magnitude * sign(W), recomputed in place at every backward pass (no allocation)."""

    stored_feedback: ClassVar[bool] = False

    def _register(self, layer, magnitude: Tensor) -> None:
        layer.register_buffer("feedback_magnitude", magnitude)
        layer.register_buffer("feedback", torch.empty_like(layer.weight, requires_grad=False))
        self.refresh(layer)

    def backward_hooks(self, layer, input):
        return functools.partial(self.refresh, layer), None

    @staticmethod
    @torch.no_grad()
    def refresh(layer) -> Tensor:
        torch.sign(layer.weight, out=layer.feedback)
        return layer.feedback.mul_(layer.feedback_magnitude)


@dataclass
class UniformSignFeedback(_SignSymmetry):
    """usf: B = s * sign(W); s = feedback_scale or the RMS of W at conversion (then |B| = |W|).

    s is kept in the 0-d buffer ``feedback_magnitude`` so state_dict restores it. Xiao et al. (2019)
    use s = 1/sqrt(fan_in); BioTorch uses 1/sqrt(3 fan_in), the std of the default init.
    """

    name: ClassVar[str] = "usf"
    feedback_scale: float | None = None

    def init(self, layer):
        weight = layer.weight.detach()
        if self.feedback_scale is None:
            scale = weight.pow(2).mean().sqrt()
        else:
            scale = weight.new_full((), float(self.feedback_scale))
        self._register(layer, scale)


@dataclass
class FixedRandomSignFeedback(_SignSymmetry):
    """frsf: B = |M| sign(W) with |M| ~ U(0, s) drawn once (M Kaiming-uniform), s as in fa."""

    name: ClassVar[str] = "frsf"
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        bound = _default_bound(layer.weight) if self.feedback_scale is None else self.feedback_scale
        magnitude = _uniform(layer.weight.shape, 0.0, bound, layer.weight, self.generator)
        self._register(layer, magnitude)


@dataclass
class BatchwiseRandomSignFeedback(_SignSymmetry):
    """brsf: B = |M| sign(W) with |M| ~ U(0, s) redrawn at every backward pass, s as in fa.

    The redraw uses the layer device's global RNG, or ``generator`` (then on the layer's device).
    """

    name: ClassVar[str] = "brsf"
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        _check_generator_device(self, layer, self.generator)
        if self.feedback_scale is None:
            self.feedback_scale = _default_bound(layer.weight)
        bound = self.feedback_scale
        magnitude = _uniform(layer.weight.shape, 0.0, bound, layer.weight, self.generator)
        self._register(layer, magnitude)

    def backward_hooks(self, layer, input):
        return functools.partial(self.redraw_and_refresh, layer), None

    @torch.no_grad()
    def redraw_and_refresh(self, layer) -> Tensor:
        layer.feedback_magnitude.uniform_(0.0, self.feedback_scale, generator=self.generator)
        return self.refresh(layer)


@dataclass
class DirectFeedbackAlignment(FeedbackRule):
    """dfa: dL/dx := e @ B_l with e = dL/d(model output) and B_l ~ U(-s, s) fixed.

    B_l has shape (n_outputs, input features per sample) - the documented exception to "feedback
    has the weight's shape". Both sizes are only known once the model has run, so B_l is drawn
    at the first backward pass (``.feedback`` is empty until then); s = feedback_scale or
    1/sqrt(n_outputs). The weight gradient uses the layer's own delta, which for the last layer
    is e itself and for the others is the projection made by the layer above. A layer whose
    input needs no gradient (the first one) never draws B_l. Memory: B_l holds n_outputs times
    the per-sample input size, which is large for early conv layers of big images.
    """

    name: ClassVar[str] = "dfa"
    stored_feedback: ClassVar[bool] = False
    feedback_scale: float | None = None
    generator: torch.Generator | None = None
    channel: _OutputErrorChannel | None = dataclasses.field(default=None, repr=False)

    def init(self, layer):
        layer.register_buffer("feedback", layer.weight.new_empty(0))

    def backward_hooks(self, layer, input):
        slot = self.channel.current if self.channel is not None else None
        if slot is None:
            if torch.is_grad_enabled():
                raise UserError(
                    f"dfa layer '{layer.layer_name}' ran outside the model given to convert; "
                    "call the converted model (it delivers the output error), not the layer"
                )
            return None, None
        if not input.requires_grad:  # first layer: B_l would never be used, do not draw it
            return None, slot
        return functools.partial(self.refresh, layer, input.shape, slot), slot

    @torch.no_grad()
    def refresh(self, layer, input_shape, slot: _OutputError) -> Tensor:
        if slot.error is None:
            raise UserError(
                f"dfa layer '{layer.layer_name}' got no output error; backpropagate from the "
                "converted model's output (loss = loss_fn(model(x), y); loss.backward())"
            )
        shape = (slot.error[0].numel(), math.prod(input_shape[1:]))
        if layer.feedback.numel() == 0:
            bound = self.feedback_scale
            if bound is None:
                bound = 1.0 / math.sqrt(shape[0])
            layer.feedback = _uniform(shape, -bound, bound, layer.weight, self.generator)
        elif tuple(layer.feedback.shape) != shape:
            raise UserError(
                f"dfa layer '{layer.layer_name}' has feedback of shape "
                f"{tuple(layer.feedback.shape)} but now needs {shape} (output or input size "
                "changed); convert a fresh model for the new sizes"
            )
        return layer.feedback


@dataclass
class WeightMirror(FeedbackRule):
    """wm: B <- (1 - lr wd) B + lr (y^T xi)/n, xi ~ N(0, noise_std^2), y = W xi (Akrout 2019).

    E[y^T xi]/n = noise_std^2 W, so B tends to (noise_std^2 / weight_decay) W: with the defaults
    (noise_std 1, weight_decay 1) B tracks W itself, relaxing by lr * weight_decay per step.
    B starts as fa's random draw.
    """

    name: ClassVar[str] = "wm"
    lr: float = 0.01
    weight_decay: float = 1.0
    noise_std: float = 1.0
    batch_size: int = 64
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        _check_generator_device(self, layer, self.generator)
        FeedbackAlignment(self.feedback_scale, self.generator).init(layer)

    def step(self, layer):
        layer.weight_mirror_update(
            self.lr, self.weight_decay, self.noise_std, self.batch_size, generator=self.generator
        )


@dataclass
class KolenPollack(FeedbackRule):
    """kp: B <- (1 - lr wd) B - lr dL/dW, the same update the weight gets (Akrout 2019).

    Give the optimiser's learning rate and weight decay; W - B then shrinks by (1 - lr wd) per
    step. With momentum the weight's update is not lr * grad, so B follows it only approximately.
    B starts as fa's random draw.
    """

    name: ClassVar[str] = "kp"
    lr: float = 0.01
    weight_decay: float = 0.0
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        FeedbackAlignment(self.feedback_scale, self.generator).init(layer)

    def step(self, layer):
        layer.kolen_pollack_update(self.lr, self.weight_decay)


@dataclass
class Learned(FeedbackRule):
    """learned: B is fa's random draw until ``layer.set_feedback`` sets it; otherwise fixed."""

    name: ClassVar[str] = "learned"
    feedback_scale: float | None = None
    generator: torch.Generator | None = None

    def init(self, layer):
        FeedbackAlignment(self.feedback_scale, self.generator).init(layer)


_RULE_CLASSES: dict[str, type[FeedbackRule]] = {
    cls.name: cls
    for cls in (
        Backprop,
        FeedbackAlignment,
        UniformSignFeedback,
        FixedRandomSignFeedback,
        BatchwiseRandomSignFeedback,
        DirectFeedbackAlignment,
        WeightMirror,
        KolenPollack,
        Learned,
    )
}
RULES: tuple[str, ...] = tuple(_RULE_CLASSES)


def _check_rule_name(rule: Any) -> str:
    if rule not in _RULE_CLASSES:
        raise UserError(f"unknown learning rule {rule!r}; valid rules: {', '.join(RULES)}")
    return rule


def _rule_options(name: str) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(_RULE_CLASSES[name]) if f.name != "channel")


def make_rule(name: str, **options) -> FeedbackRule:
    """The strategy object of rule ``name`` with its options (validated)."""
    valid = _rule_options(_check_rule_name(name))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for rule '{name}'; "
            f"valid options: {', '.join(valid) or 'none'}"
        )
    return _RULE_CLASSES[name](**options)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


class _FeedbackLayer:
    """What FeedbackLinear and FeedbackConv2d share: the rule, its buffers and its updates."""

    feedback: Tensor
    feedback_rule: FeedbackRule
    layer_name: str

    def _attach_rule(self, rule: str | FeedbackRule, options: Mapping[str, Any]) -> None:
        if isinstance(rule, FeedbackRule):
            if options:
                raise UserError("give options either in the FeedbackRule object or as keywords")
        else:
            rule = make_rule(rule, **options)
        for buffer in ("feedback", "feedback_magnitude"):
            self._buffers.pop(buffer, None)
        self.feedback_rule = rule
        with torch.no_grad():
            rule.init(self)

    @property
    def rule(self) -> str:
        return self.feedback_rule.name

    @classmethod
    def _from_module(cls, module, rule: FeedbackRule, layer_name: str):
        """A feedback layer using ``module``'s own weight and bias Parameters."""
        layer = cls._empty_like(module)
        layer.weight, layer.bias = module.weight, module.bias
        layer.layer_name = layer_name
        layer._attach_rule(rule, {})
        layer.train(module.training)
        return layer

    def set_feedback(self, feedback) -> None:
        """Copy ``feedback`` (tensor or numpy array, the weight's shape, finite) into the layer."""
        if not self.feedback_rule.stored_feedback:
            raise UserError(
                f"set_feedback on layer '{self.layer_name}' which uses rule '{self.rule}'; it "
                "applies to rules fa, wm, kp and learned (convert with 'learned' to set feedback)"
            )
        value = feedback if isinstance(feedback, Tensor) else torch.as_tensor(np.asarray(feedback))
        expected = tuple(self.weight.shape)
        if tuple(value.shape) != expected:
            raise UserError(
                f"set_feedback on layer '{self.layer_name}': expected shape {expected}, "
                f"got {tuple(value.shape)}"
            )
        if not torch.isfinite(value).all():
            raise UserError(
                f"set_feedback on layer '{self.layer_name}': feedback has NaN or inf entries; "
                "pass finite values"
            )
        with torch.no_grad():
            self.feedback.copy_(value)

    def _check_rule(self, name: str, method: str) -> None:
        if self.rule != name:
            raise UserError(
                f"{method} on layer '{self.layer_name}' which uses rule '{self.rule}'; "
                f"it applies to rule '{name}' only"
            )

    @torch.no_grad()
    def kolen_pollack_update(self, lr: float, weight_decay: float) -> None:
        """feedback <- feedback - lr * weight.grad - lr * weight_decay * feedback.

        No-op when the weight has no gradient (the optimiser skips such weights too).
        """
        self._check_rule("kp", "kolen_pollack_update")
        if self.weight.grad is None:
            return
        self.feedback.mul_(1.0 - lr * weight_decay).sub_(self.weight.grad, alpha=lr)

    @torch.no_grad()
    def weight_mirror_update(
        self,
        lr: float,
        weight_decay: float,
        noise_std: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> None:
        """feedback <- (1 - lr wd) feedback + lr (y^T x) / batch_size.

        x ~ N(0, noise_std^2) is noise at the layer's input (conv: one receptive field per sample),
        y = W x its response without bias.
        """
        self._check_rule("wm", "weight_mirror_update")
        weight = self.weight.detach()
        noise = torch.randn(
            (batch_size, *self._mirror_noise_shape()),
            generator=generator,
            dtype=weight.dtype,
            device=weight.device,
        ).mul_(noise_std)
        correlation = self._mirror_correlation(noise, weight)
        self.feedback.mul_(1.0 - lr * weight_decay).add_(correlation, alpha=lr / batch_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # dfa draws its feedback lazily: take the saved shape before the copy
        saved = state_dict.get(prefix + "feedback")
        if self.rule == "dfa" and saved is not None and saved.shape != self.feedback.shape:
            self.feedback = self.weight.new_empty(saved.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rule={self.rule}"


class FeedbackLinear(_FeedbackLayer, nn.Linear):
    """nn.Linear whose backward pass sends the error through ``.feedback`` (see module docstring).

    ``FeedbackLinear(in_features, out_features, bias=True, device=None, dtype=None, *, rule="fa",
    **options)``; use ``convert`` to turn an existing network into one with feedback layers.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        rule: str | FeedbackRule = "fa",
        **options,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.layer_name = type(self).__name__
        self._attach_rule(rule, options)

    @classmethod
    def _empty_like(cls, module: nn.Linear) -> FeedbackLinear:
        return cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            device="meta",
            rule="bp",
        )

    def forward(self, input: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return F.linear(input, self.weight, self.bias)
        refresh, output_error = self.feedback_rule.backward_hooks(self, input)
        return LinearFeedbackFunction.apply(
            input, self.weight, self.bias, self.feedback, refresh, output_error
        )

    def _mirror_noise_shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def _mirror_correlation(self, noise: Tensor, weight: Tensor) -> Tensor:
        return F.linear(noise, weight).t().mm(noise)


class FeedbackConv2d(_FeedbackLayer, nn.Conv2d):
    """nn.Conv2d whose backward pass sends the error through ``.feedback``.

    Every nn.Conv2d setting is supported: stride, dilation, groups, int/tuple/'same'/'valid'
    padding and every padding_mode (non-zero modes pad with F.pad first, as nn.Conv2d does).
    ``FeedbackConv2d(in_channels, out_channels, kernel_size, ..., *, rule="fa", **options)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        rule: str | FeedbackRule = "fa",
        **options,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self.layer_name = type(self).__name__
        self._attach_rule(rule, options)

    @classmethod
    def _empty_like(cls, module: nn.Conv2d) -> FeedbackConv2d:
        return cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            device="meta",
            rule="bp",
        )

    def forward(self, input: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            return self._conv_forward(input, self.weight, self.bias)
        padding = self.padding
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0, 0)
        refresh, output_error = self.feedback_rule.backward_hooks(self, input)
        return Conv2dFeedbackFunction.apply(
            input,
            self.weight,
            self.bias,
            self.feedback,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            refresh,
            output_error,
        )

    def _mirror_noise_shape(self) -> tuple[int, ...]:
        # one receptive field (dilated kernel extent): the response y is 1x1 and every weight
        # entry sees the noise exactly once, so E[correlation] = batch * noise_std^2 * W exactly
        extent = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation, strict=True)]
        return (self.in_channels, *extent)

    def _mirror_correlation(self, noise: Tensor, weight: Tensor) -> Tensor:
        response = F.conv2d(noise, weight, None, 1, 0, self.dilation, self.groups)
        return torch.nn.grad.conv2d_weight(
            noise, weight.shape, response, 1, 0, self.dilation, self.groups
        )


# --------------------------------------------------------------------------------------------
# Converting a model
# --------------------------------------------------------------------------------------------

_LAYER_CLASSES = ((nn.Linear, FeedbackLinear), (nn.Conv2d, FeedbackConv2d))
# modules with parameters whose backward does not route the error through a weight matrix
_NOT_WEIGHT_TRANSPORT = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.PReLU,
)


def _feedback_class(module: nn.Module) -> type[_FeedbackLayer] | None:
    """The feedback layer that can replace ``module``, or None."""
    if isinstance(module, _FeedbackLayer):
        return type(module)
    for plain, feedback_class in _LAYER_CLASSES:
        if (
            isinstance(module, plain)
            and type(module).forward is plain.forward  # no custom forward
            and isinstance(module.weight, nn.Parameter)  # not lazy, not old-style weight_norm
            and not isinstance(module.weight, nn.parameter.UninitializedParameter)
            and not torch.nn.utils.parametrize.is_parametrized(module)
        ):
            return feedback_class
    return None


def _scan(model: nn.Module):
    """(convertible {name: module}, names of modules with weights that stay on backprop)."""
    convertible: dict[str, nn.Module] = {}
    unconvertible: list[str] = []
    attention: list[str] = []
    for name, module in model.named_modules():
        # MultiheadAttention uses its out_proj's weight directly, not out_proj.forward
        if any(name.startswith(prefix + ".") for prefix in attention):
            continue
        if _feedback_class(module) is not None:
            convertible[name] = module
        elif isinstance(module, _NOT_WEIGHT_TRANSPORT):
            continue
        elif any(True for _ in module.parameters(recurse=False)) or isinstance(
            module, nn.MultiheadAttention
        ):
            unconvertible.append(f"{name or '<model>'} ({type(module).__name__})")
            if isinstance(module, nn.MultiheadAttention):
                attention.append(name)
    return convertible, unconvertible


def convert(model: nn.Module, rule: str | Mapping[str, str], **options) -> nn.Module:
    """Replace every nn.Linear and nn.Conv2d of ``model`` by the feedback layer of ``rule``.

    ``rule`` is a rule name (see RULES) or a dict {qualified module name: rule name} with key
    "default" for the other layers (without "default" they stay as they are). ``options`` are the
    rules' hyperparameters (e.g. lr=, weight_decay= for kp); each must be valid for at least one
    rule used, and each layer receives the ones its rule accepts. Weights and biases (the same
    Parameter objects), device, dtype and train/eval mode are kept. Modules with weights that
    cannot be converted stay on backprop and are named in one warning. Returns the model (a new
    object only when ``model`` itself is a Linear/Conv2d). Module hooks of replaced layers are
    not carried over.
    """
    convertible, unconvertible = _scan(model)
    if isinstance(rule, Mapping):
        rule_of = dict(rule)
        default = rule_of.pop("default", None)
        unknown = sorted(set(rule_of) - set(convertible))
        if unknown:
            raise UserError(
                f"rule dict names {', '.join(map(repr, unknown))}, not Linear/Conv2d modules of "
                f"the model; convertible modules: {', '.join(convertible) or 'none'}"
            )
        for name in convertible:
            rule_of.setdefault(name, default)
        used = {_check_rule_name(r) for r in rule_of.values() if r is not None}
        if default is not None:
            used.add(_check_rule_name(default))
    else:
        used = {_check_rule_name(rule)}
        rule_of = dict.fromkeys(convertible, rule)
    used_rules = [name for name in RULES if name in used]
    valid = list(dict.fromkeys(option for name in used_rules for option in _rule_options(name)))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise UserError(
            f"unknown option(s) {', '.join(unknown)} for rule(s) {', '.join(used_rules)}; "
            f"valid options: {', '.join(valid) or 'none'}"
        )

    channel: _OutputErrorChannel | None = None
    replacement: dict[int, nn.Module] = {}
    for name, module in convertible.items():
        rule_name = rule_of[name]
        if rule_name is None:
            continue
        accepted = set(_rule_options(rule_name))
        strategy = make_rule(rule_name, **{k: v for k, v in options.items() if k in accepted})
        if isinstance(strategy, DirectFeedbackAlignment):
            channel = channel or _OutputErrorChannel()
            strategy.channel = channel
        feedback_class = _feedback_class(module)
        replacement[id(module)] = feedback_class._from_module(module, strategy, name or "<model>")

    if id(model) in replacement:
        model = replacement[id(model)]
    for parent in model.modules():
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacement:
                setattr(parent, child_name, replacement[id(child)])

    old_channel = getattr(model, "_dfa_output_error", None)
    if old_channel is not None:
        old_channel.detach()
        del model._dfa_output_error
    if channel is not None:
        channel.attach(model)
        model._dfa_output_error = channel
    if unconvertible:
        warnings.warn(
            "convert: these modules have weights but are not nn.Linear/nn.Conv2d (or have a custom "
            f"forward), so they stay on backprop: {', '.join(unconvertible)}",
            stacklevel=2,
        )
    return model


def feedback_layers(model: nn.Module) -> list[tuple[str, _FeedbackLayer]]:
    """[(qualified name, layer)] for every feedback layer of ``model``, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _FeedbackLayer)]


@torch.no_grad()
def step_feedback(model: nn.Module) -> None:
    """Apply each layer's rule update (wm, kp) with the options given to convert.

    Call after every optimiser step, before the gradients are zeroed (kp reads weight.grad).
    """
    for _, layer in feedback_layers(model):
        layer.feedback_rule.step(layer)


#: rules whose feedback ``xiao2019_feedback`` sets (the ones in Xiao et al.'s code)
XIAO2019_RULES = ("usf", "fa", "frsf")


def xiao2019_scale(layer: nn.Module) -> float:
    """Xiao et al.'s per-layer constant c: conv sqrt(2 / (k_h k_w out_channels)) (He fan-out std,
    torchvision's ResNet conv init), linear 1 / sqrt(in_features)."""
    if isinstance(layer, nn.Conv2d):
        k_h, k_w = layer.kernel_size
        return math.sqrt(2.0 / (k_h * k_w * layer.out_channels))
    return 1.0 / math.sqrt(layer.in_features)


@torch.no_grad()
def xiao2019_feedback(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give the usf, fa and frsf layers of ``model`` the feedback of Xiao et al. (2019)'s code.

    With c = ``xiao2019_scale(layer)`` (METHOD 8, willwx/sign-symmetry):

        usf   B = c sign(W)                  (feedback_magnitude = c)
        fa    conv: B ~ N(0, c^2);  linear: B ~ U(-c, c)                       fixed
        frsf  B = |M| sign(W), M drawn as fa's B                              fixed |M|

    Other rules are left as they are (the authors' code has no other rule). Draws are made in
    module order on the generator's device (CPU by default; torch's global RNG without one) and
    copied into the layers' buffers, so a seed gives the same feedback on every device.
    """
    device = generator.device if generator is not None else torch.device("cpu")
    for _, layer in feedback_layers(model):
        rule, scale = layer.rule, xiao2019_scale(layer)
        if rule == "usf":
            layer.feedback_magnitude.fill_(scale)
            UniformSignFeedback.refresh(layer)
        elif rule in ("fa", "frsf"):
            draw = torch.empty(layer.weight.shape, dtype=layer.weight.dtype, device=device)
            if isinstance(layer, nn.Conv2d):
                draw.normal_(0.0, scale, generator=generator)
            else:
                draw.uniform_(-scale, scale, generator=generator)
            if rule == "fa":
                layer.feedback.copy_(draw)
            else:
                layer.feedback_magnitude.copy_(draw.abs_())
                FixedRandomSignFeedback.refresh(layer)
