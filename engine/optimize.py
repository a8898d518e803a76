"""engine.optimize(model): swap the torch.nn and transformers modules of an existing model for
engine ones that share the same parameters, and say what was swapped and what was left alone.

    summary = engine.optimize(model)     # in place; returns an OptimizeSummary
    print(summary)

What is swapped (each only when its forward is the library's own, not a subclass's override):
    torch.nn      LayerNorm, RMSNorm, GELU, MultiheadAttention, TransformerEncoderLayer,
                  TransformerDecoderLayer -> engine.nn's; and the containers TransformerEncoder,
                  TransformerDecoder, Transformer (whose torch forward would feed nested tensors
                  to the layers in eval mode), with the layers inside them
    transformers  GPT-2: GPT2Attention (self- and cross-attention), GPT2MLP.
                  BERT: BertSelfAttention, BertSelfOutput, BertIntermediate, BertOutput,
                  BertPredictionHeadTransform (the layer norms inside the last three are computed
                  by the replacement's fused add + norm). Other nn.LayerNorm / GELU modules of
                  these models (GPT-2's ln_1, ln_2, ln_f, BERT's embedding norm) by the torch.nn rules.

No parameter is copied: a swapped module holds the very Parameter (and buffer and child module)
objects of the original, so an optimizer built before optimize() keeps working and the
state_dict keys do not change. The transformers replacements are subclasses of the original
classes (isinstance checks and transformers' output-capturing hooks still match) whose forward
takes the same arguments and returns the same structure; where a call asks for something they do
not serve (attention weights, an attention implementation other than "eager"/"sdpa", a cache
that is not a transformers Cache) they run the original forward for that call.
"""
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor

import engine.functional as EF
from engine import nn as enn

__all__ = ["optimize", "OptimizeSummary", "Replacement", "Skip"]


@dataclass
class Replacement:
    """One swapped module: its dotted path in the model, its class and the engine class now there;
    note: what the replacement falls back on, if anything."""
    path: str
    original: str
    replacement: str
    note: str = ""


@dataclass
class Skip:
    """A module optimize() recognized but left alone, and why."""
    path: str
    original: str
    reason: str


@dataclass
class OptimizeSummary:
    """What engine.optimize did: `replaced` and `skipped` (left alone, with the reason)."""
    replaced: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def counts(self) -> dict:
        """{"OriginalClass -> EngineClass": how many} of the swaps."""
        out = {}
        for r in self.replaced:
            key = f"{r.original} -> {r.replacement}"
            out[key] = out.get(key, 0) + 1
        return out

    def __str__(self) -> str:
        lines = [f"engine.optimize: replaced {len(self.replaced)} module(s), left {len(self.skipped)} alone"]
        groups = {}
        for r in self.replaced:
            groups.setdefault((r.original, r.replacement, r.note), []).append(r.path)
        for (original, replacement, note), paths in groups.items():
            paths = [p or "<root>" for p in paths]
            shown = ", ".join(paths[:4]) + (f", ... ({len(paths) - 4} more)" if len(paths) > 4 else "")
            lines.append(f"  replaced {len(paths):3d} x {original} -> {replacement}: {shown}")
            if note:
                lines.append(f"                 ({note})")
        for s in self.skipped:
            lines.append(f"  left alone     {s.path or '<root>'} ({s.original}): {s.reason}")
        return "\n".join(lines)


def optimize(model: torch.nn.Module) -> OptimizeSummary:
    """Swaps, in place, every module of `model` that the engine serves for an engine module sharing
    its parameters (see the module docstring for the list) and returns an OptimizeSummary. The
    model's outputs stay equal within floating-point tolerance; call it again after adding
    modules (already swapped modules are not touched twice). A root module that is itself
    swappable (optimize(nn.LayerNorm(8))) changes class in place."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize expects a torch.nn.Module, got {type(model).__name__}")
    summary = OptimizeSummary()
    rules = _rules()
    swapped = {}   # id(original) -> replacement, so a module shared by two parents stays shared

    def decide(module: torch.nn.Module) -> tuple[Optional[_Rule], Optional[str]]:
        rule = _match(rules, module)
        if rule is None:
            return None, None
        reason = rule.why_not(module)
        if reason is None and "forward" in vars(module):
            reason = "its forward is patched on the instance (accelerate hooks or similar), which a swap would lose"
        return rule, reason

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        # parent._modules, not named_children(): that one skips a module's second appearance
        for name, child in list(parent._modules.items()):
            if child is None:
                continue
            path = f"{prefix}.{name}" if prefix else name
            if id(child) in swapped:
                setattr(parent, name, swapped[id(child)])
                continue
            rule, reason = decide(child)
            if rule is None:
                if not _fused(child):  # an engine layer already runs its children through fused ops
                    visit(child, path)
                continue
            if reason is not None:
                summary.skipped.append(Skip(path, type(child).__name__, reason))
                visit(child, path)
                continue
            new = _rebind(child, rule.target)
            swapped[id(child)] = new
            setattr(parent, name, new)
            summary.replaced.append(Replacement(path, type(child).__name__, _class_name(new), rule.note))
            if rule.recurse:
                visit(new, path)

    # the root has no parent to hold a new object: it changes class in place (the engine classes
    # hold no state of their own, so that is the same swap)
    rule, reason = decide(model)
    if rule is not None and reason is not None:
        summary.skipped.append(Skip("", type(model).__name__, reason))
    elif rule is not None:
        original = type(model).__name__
        model.__class__ = rule.target
        summary.replaced.append(Replacement("", original, _class_name(model), rule.note))
        if not rule.recurse:
            return summary
    visit(model, "")
    return summary


# ---------------------------------------------------------------------------------------------
# Rules: which module classes are swapped, when, and for what


@dataclass
class _Rule:
    matches: Callable[[torch.nn.Module], bool]               # is this module one the rule is about?
    why_not: Callable[[torch.nn.Module], Optional[str]]     # None, or why it is left alone
    target: Optional[type]                                   # the engine subclass (no state of its own)
    note: str = ""
    recurse: bool = False   # swap inside the replacement too (containers whose children run as modules)


def _match(rules, module) -> Optional[_Rule]:
    for rule in rules:
        if rule.matches(module):
            return rule
    return None


def _class_name(module) -> str:
    cls = type(module)
    if cls.__module__.startswith("engine.nn"):
        return f"engine.nn.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _rebind(module: torch.nn.Module, cls: type) -> torch.nn.Module:
    """A new `cls` object (a subclass of module's class, with no state of its own) holding module's
    state: the same Parameter, buffer and child-module objects (no copy of any tensor), its
    attributes, its training flag and its hooks. The containers (dicts of parameters, hooks, ...)
    are copied, so that the original object stays intact."""
    new = cls.__new__(cls)
    state = {}
    for key, value in vars(module).items():
        state[key] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
    new.__dict__.update(state)
    return new


def _fused(module: torch.nn.Module) -> bool:
    """An engine module that computes its children's work itself (an engine layer, or one of the
    transformers replacements below): nothing inside it is worth swapping."""
    containers = (enn.TransformerEncoder, enn.TransformerDecoder, enn.Transformer)
    return (type(module).__module__.startswith("engine.nn.") and not isinstance(module, containers)) \
        or type(module) in _hf_classes().values()


def _exact_forward(base: type) -> Callable[[torch.nn.Module], bool]:
    """Matches instances of `base` whose class does not override forward (a subclass with its own
    forward computes something else) and which are not engine modules already."""
    def matches(module):
        return isinstance(module, base) and type(module).forward is base.forward
    return matches


def _subclass_with_own_forward(base: type, engine_cls: type) -> Callable[[torch.nn.Module], bool]:
    def matches(module):
        return isinstance(module, base) and not isinstance(module, engine_cls) and type(module).forward is not base.forward
    return matches


def _rules() -> list:
    def always(module):
        return None

    # (torch class, engine subclass, swap inside it too?) The layers run their children through
    # their own fused forward (attention, add + norm, feed-forward), so their insides are not
    # swapped; the stacks call their layers as modules, so theirs are.
    torch_swaps = [
        (torch.nn.LayerNorm, enn.LayerNorm, False), (torch.nn.RMSNorm, enn.RMSNorm, False),
        (torch.nn.GELU, enn.GELU, False), (torch.nn.MultiheadAttention, enn.MultiheadAttention, False),
        (torch.nn.TransformerEncoderLayer, enn.TransformerEncoderLayer, False),
        (torch.nn.TransformerDecoderLayer, enn.TransformerDecoderLayer, False),
        (torch.nn.TransformerEncoder, enn.TransformerEncoder, True),
        (torch.nn.TransformerDecoder, enn.TransformerDecoder, True),
        (torch.nn.Transformer, enn.Transformer, True),
    ]
    notes = {
        torch.nn.MultiheadAttention: "fully masked query rows give zeros where torch gives NaN",
        torch.nn.TransformerEncoder: "never converts inputs to nested tensors: padded positions get computed "
                                     "values where torch's eval fast path gives zeros",
    }
    rules = [_Rule(_exact_forward(base), always, engine_cls, notes.get(base, ""), recurse)
             for base, engine_cls, recurse in torch_swaps]
    for base, engine_cls, _ in torch_swaps:
        rules.append(_Rule(_subclass_with_own_forward(base, engine_cls),
                           lambda m, b=base: f"a subclass of torch.nn.{b.__name__} with its own forward", None))
    rules += _hf_rules()
    return rules


# ---------------------------------------------------------------------------------------------
# transformers' GPT-2 and BERT modules


def _hf_activation(act) -> Optional[str]:
    """The engine epilogue activation that computes transformers' (or torch's) activation module
    `act` exactly, or None. GELUActivation is the erf form whichever of its two implementations it
    holds; GELUTanh, NewGELUActivation and FastGELUActivation are all the tanh form."""
    from transformers import activations as A
    if "forward" in vars(act):  # patched on the instance: not the class's math any more
        return None
    if type(act) in (torch.nn.GELU, enn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    return {A.GELUActivation: "gelu", A.NewGELUActivation: "gelu_tanh", A.GELUTanh: "gelu_tanh",
            A.FastGELUActivation: "gelu_tanh", torch.nn.ReLU: "relu"}.get(type(act))


def _attention_requested() -> bool:
    """True when the running transformers forward collects attention weights (output_attentions)."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers version: be safe, serve nothing it might want
        return True
    collected = _active_collector.get()
    return bool(collected) and any(k in collected for k in ("attentions", "cross_attentions"))


def _hf_attention(module, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], dropout_p: float,
                  scaling: float, is_causal: Optional[bool]) -> Tensor:
    """transformers' attention interface ("sdpa" or "eager") computed by the engine's flash
    attention. q [B, H, Sq, D], k and v [B, H, Sk, D]; mask None, bool [B or 1, 1 or H, Sq, Sk]
    (True = attend) or float (added). Returns [B, Sq, H, D], as the interface does."""
    implementation = module.config._attn_implementation
    if implementation == "sdpa":
        # the rule of transformers' sdpa_attention_forward: causal only while prefilling without a mask
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = q.shape[2] > 1 and mask is None and causal
        if causal and k.shape[2] > q.shape[2]:  # a static cache's prefill: only the first Sq keys are real
            k, v = k[:, :, :q.shape[2]], v[:, :, :q.shape[2]]
    else:  # eager: the mask alone decides what is seen
        causal = False
    out = EF.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                         scale=scaling)
    return out.transpose(1, 2)


_HF_CLASSES = None


def _hf_classes():
    """The engine subclasses of transformers' modules, built once (transformers is optional)."""
    global _HF_CLASSES
    if _HF_CLASSES is not None:
        return _HF_CLASSES
    try:
        from transformers.cache_utils import Cache, EncoderDecoderCache
        from transformers.models.bert import modeling_bert as mb
        from transformers.models.gpt2 import modeling_gpt2 as mg
    except ImportError:
        _HF_CLASSES = {}
        return _HF_CLASSES

    def served(module, cache) -> bool:
        """Can the engine forward serve this call (else the original forward runs)?"""
        return (module.config._attn_implementation in ("sdpa", "eager") and not _attention_requested()
                and (cache is None or isinstance(cache, Cache)))

    class EngineBertSelfAttention(mb.BertSelfAttention):
        """BertSelfAttention whose attention runs engine.functional.scaled_dot_product_attention."""

        def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
            if "past_key_values" in kwargs:  # the deprecated name of `cache`
                cache = kwargs.pop("past_key_values")
            if not served(self, cache) or kwargs.get("output_attentions"):
                return super().forward(hidden_states, attention_mask=attention_mask, cache=cache, **kwargs)
            shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)   # [B, S, heads, d]
            q = EF.linear(hidden_states, self.query.weight, self.query.bias).view(shape).transpose(1, 2)
            k = EF.linear(hidden_states, self.key.weight, self.key.bias).view(shape).transpose(1, 2)
            v = EF.linear(hidden_states, self.value.weight, self.value.bias).view(shape).transpose(1, 2)
            if cache is not None:
                current = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
                k, v = current.update(k, v, self.layer_idx, kwargs=kwargs)
            out = _hf_attention(self, q, k, v, attention_mask, self.dropout.p if self.training else 0.0,
                                self.scaling, kwargs.get("is_causal"))
            return out.reshape(*hidden_states.shape[:-1], -1), None

    class EngineBertResidualOutput:
        """BertSelfOutput / BertOutput: LayerNorm(dropout(dense(h)) + input), the add fused into the norm."""

        def forward(self, hidden_states, input_tensor):
            h = EF.linear(hidden_states, self.dense.weight, self.dense.bias)
            if self.training and self.dropout.p > 0:
                h = torch.nn.functional.dropout(h, self.dropout.p, True)
            norm = self.LayerNorm
            y, _ = EF.add_layer_norm(h, input_tensor, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            return y

    class EngineBertSelfOutput(EngineBertResidualOutput, mb.BertSelfOutput):
        forward = EngineBertResidualOutput.forward

    class EngineBertOutput(EngineBertResidualOutput, mb.BertOutput):
        forward = EngineBertResidualOutput.forward

    class EngineBertIntermediate(mb.BertIntermediate):
        """BertIntermediate: the activation fused into the product's epilogue."""

        def forward(self, hidden_states):
            return EF.linear(hidden_states, self.dense.weight, self.dense.bias,
                            _hf_activation(self.intermediate_act_fn))

    class EngineBertPredictionHeadTransform(mb.BertPredictionHeadTransform):
        """The MLM head's transform: LayerNorm(act(dense(h))), the activation in the epilogue."""

        def forward(self, hidden_states):
            h = EF.linear(hidden_states, self.dense.weight, self.dense.bias, _hf_activation(self.transform_act_fn))
            norm = self.LayerNorm
            return EF.layer_norm(h, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    class EngineGPT2Attention(mg.GPT2Attention):
        """GPT2Attention: Conv1D products through engine.functional.linear (Conv1D's [in, out]
        weight read transposed in place), attention through the engine's flash attention."""

        def forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, output_attentions=False, **kwargs):
            if "past_key_values" in kwargs:
                cache = kwargs.pop("past_key_values")
            if not served(self, cache) or output_attentions:
                return super().forward(hidden_states, cache=cache, attention_mask=attention_mask,
                                       encoder_hidden_states=encoder_hidden_states,
                                       encoder_attention_mask=encoder_attention_mask,
                                       output_attentions=output_attentions, **kwargs)
            cross = encoder_hidden_states is not None
            current, updated = cache, False
            if isinstance(cache, EncoderDecoderCache):
                updated = cache.is_updated.get(self.layer_idx)
                current = cache.cross_attention_cache if cross else cache.self_attention_cache
            if cross:
                if not hasattr(self, "q_attn"):
                    raise ValueError("this GPT2Attention has no q_attn: it is not a cross-attention "
                                     "(is_cross_attention=False), so encoder_hidden_states cannot be attended")
                query = _conv1d(self.q_attn, hidden_states)
                attention_mask = encoder_attention_mask
                if cache is not None and updated:
                    key, value = current.layers[self.layer_idx].keys, current.layers[self.layer_idx].values
                else:
                    key, value = _conv1d(self.c_attn, encoder_hidden_states).split(self.split_size, dim=2)
                    key, value = _heads(key, self.head_dim), _heads(value, self.head_dim)
            else:
                query, key, value = _conv1d(self.c_attn, hidden_states).split(self.split_size, dim=2)
                key, value = _heads(key, self.head_dim), _heads(value, self.head_dim)
            query = _heads(query, self.head_dim)
            if cache is not None and (not cross or not updated):
                key, value = current.update(key, value, self.layer_idx, kwargs=kwargs)
                if cross:
                    cache.is_updated[self.layer_idx] = True
            out = _hf_attention(self, query, key, value, attention_mask,
                                self.attn_dropout.p if self.training else 0.0, self.scaling, kwargs.get("is_causal"))
            out = _conv1d(self.c_proj, out.reshape(*out.shape[:-2], -1))
            return self.resid_dropout(out), None

    class EngineGPT2MLP(mg.GPT2MLP):
        """GPT2MLP: both products and the activation in engine.functional.feed_forward."""

        def forward(self, hidden_states):
            out = EF.feed_forward(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.c_proj.weight.t(),
                                 self.c_proj.bias, _hf_activation(self.act))
            return self.dropout(out)

    _HF_CLASSES = {
        mb.BertSelfAttention: EngineBertSelfAttention, mb.BertSelfOutput: EngineBertSelfOutput,
        mb.BertOutput: EngineBertOutput, mb.BertIntermediate: EngineBertIntermediate,
        mb.BertPredictionHeadTransform: EngineBertPredictionHeadTransform,
        mg.GPT2Attention: EngineGPT2Attention, mg.GPT2MLP: EngineGPT2MLP,
    }
    return _HF_CLASSES


def _conv1d(conv, x: Tensor) -> Tensor:
    """transformers' Conv1D (x @ W + b, W [in, out]) as engine.functional.linear on W^T (a view)."""
    return EF.linear(x, conv.weight.t(), conv.bias)


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """[B, S, H * d] -> [B, H, S, d] (a strided view)."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _hf_rules() -> list:
    classes = _hf_classes()
    if not classes:
        return []
    from transformers.models.bert import modeling_bert as mb
    from transformers.models.gpt2 import modeling_gpt2 as mg
    from transformers.pytorch_utils import Conv1D

    def attention_why_not(module):
        impl = getattr(module.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager", None):
            return f"attention implementation {impl!r} (engine serves 'sdpa' and 'eager' masks)"
        return None

    def linear_why_not(*names):
        def why_not(module):
            for name in names:
                sub = getattr(module, name, None)
                if sub is not None and type(sub) not in (torch.nn.Linear, enn.Linear, Conv1D):
                    return f"{name} is a {type(sub).__name__}, not a plain Linear/Conv1D (quantized or adapted?)"
                if isinstance(sub, enn.Linear) and sub.activation is not None:
                    return f"{name} carries a fused activation"
            return None
        return why_not

    def norm_why_not(module):
        norm = module.LayerNorm
        if not isinstance(norm, torch.nn.LayerNorm) or type(norm).forward not in (torch.nn.LayerNorm.forward,
                                                                                   enn.LayerNorm.forward):
            return f"its LayerNorm is a {type(norm).__name__}"
        return None

    def activation_why_not(attr):
        def why_not(module):
            if _hf_activation(getattr(module, attr)) is None:
                return (f"activation {type(getattr(module, attr)).__name__} has no fused engine epilogue "
                        "(engine fuses gelu, gelu_tanh and relu)")
            return None
        return why_not

    def both(*checks):
        def why_not(module):
            for check in checks:
                reason = check(module)
                if reason is not None:
                    return reason
            return None
        return why_not

    fallback = ("runs transformers' forward for calls asking for attention weights or with a cache that is not "
                "a transformers Cache")
    specs = [
        (mb.BertSelfAttention, both(attention_why_not, linear_why_not("query", "key", "value")), fallback),
        (mb.BertSelfOutput, both(linear_why_not("dense"), norm_why_not), ""),
        (mb.BertOutput, both(linear_why_not("dense"), norm_why_not), ""),
        (mb.BertIntermediate, both(linear_why_not("dense"), activation_why_not("intermediate_act_fn")), ""),
        (mb.BertPredictionHeadTransform,
         both(linear_why_not("dense"), activation_why_not("transform_act_fn"), norm_why_not), ""),
        (mg.GPT2Attention, both(attention_why_not, linear_why_not("c_attn", "c_proj", "q_attn")), fallback),
        (mg.GPT2MLP, both(linear_why_not("c_fc", "c_proj"), activation_why_not("act")), ""),
    ]
    rules = []
    for base, why_not, note in specs:
        engine_cls = classes[base]
        rules.append(_Rule(_exact_forward(base), why_not, engine_cls, note))
    return rules
