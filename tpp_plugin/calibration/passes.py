"""Running models over the calibration samples: batched forward passes, the KL divergence of
an output from the ANN's, and :func:`lockstep`, the one pass in which the ANN and the network
being quantised run side by side, node by node."""

from __future__ import annotations

import torch
from torch import fx, nn

from .graph import ADDS
from .quantiser import Probe

__all__ = [
    "REFITTABLE",
    "run_batched",
    "kl_divergence",
    "kl",
    "lockstep",
    "shares_storage",
    "feeds_probe",
    "residual_partner",
]

#: the layers whose weights :func:`lockstep` lets the calibration refit
REFITTABLE = (nn.Linear, nn.Conv2d)


def run_batched(gm, x, batch_size):
    """``gm``'s outputs for all of ``x``, computed ``batch_size`` samples at a time."""
    outs = []
    for i in range(0, x.shape[0], batch_size):
        outs.append(gm(x[i:i + batch_size]))
    return torch.cat(outs)


def lockstep(gm: fx.GraphModule, x: torch.Tensor, visit, refit=None) -> tuple:
    """Run the ANN and the network being quantised side by side on all of ``x``, node by node.

    At each ReLU call (a :class:`Probe`) ``visit(index, a, a_ann)`` gets the call's input in
    the quantised network (all earlier calls quantised) and in the ANN, and sets the probe's
    threshold and shift, which the quantised side then applies. At each conv/linear layer whose
    input differs between the two sides, ``refit(name, module, x_q, z_ann, partner, relu)`` (if
    given) returns the module the quantised side runs instead (its own weights); ``z_ann`` is
    the ANN's output of the layer, ``partner``, where that output is one term of a residual
    sum whose other term is already computed, that term on both sides (else ``None``), and
    ``relu`` whether the output (or the sum) feeds a ReLU call alone. One pass of each network
    in all — no call is recomputed. Values are freed once their last user has run.

    :return: ``(ann_output, quantised_output)``
    """
    modules = dict(gm.named_modules())
    model_storage = {t.untyped_storage().data_ptr()
                     for t in (*gm.parameters(), *gm.buffers())}
    sides = (fx.Interpreter(gm), fx.Interpreter(gm))
    for side in sides:
        side.env = {}
    users_left = {n: len(n.users) for n in gm.graph.nodes}
    first = True
    outputs = (None, None)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if first:
                value = x
            elif node.args:
                value = node.args[0]
            else:
                raise ValueError(
                    f"calibration feeds the model one input; its argument {node.target!r} "
                    "has no default value")
            first = False
            for side in sides:
                side.env[node] = value
            continue
        if node.op == "output":
            outputs = tuple(side.fetch_args_kwargs_from_env(node)[0][0] for side in sides)
            break
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, Probe):
            src = node.args[0]
            a_ann, a = sides[0].env[src], sides[1].env[src]
            visit(module.index, a, a_ann)
            # a value no one else holds is overwritten (saves a full-size copy per side)
            own = (a is not a_ann and users_left[src] == 1
                   and not any(shares_storage(t, [side.env for side in sides], model_storage)
                               for t in (a, a_ann)))
            sides[0].env[node] = a_ann.relu_() if own else torch.relu(a_ann)
            module.overwrite = own
            try:
                sides[1].env[node] = module(a)
            finally:
                module.overwrite = False
        elif (refit is not None and isinstance(module, REFITTABLE) and not node.kwargs
              and len(node.args) == 1
              and sides[0].env[node.args[0]] is not sides[1].env[node.args[0]]):
            x_ann, x_q = sides[0].env[node.args[0]], sides[1].env[node.args[0]]
            sides[0].env[node] = z_ann = module(x_ann)
            other = residual_partner(node)
            # a residual sum must match the ANN's: the target is the sum minus the other term
            partner = ((sides[0].env[other], sides[1].env[other])
                       if other is not None and other in sides[1].env else None)
            relu = feeds_probe(node, modules) or (
                partner is not None and feeds_probe(next(iter(node.users)), modules))
            sides[1].env[node] = refit(node.target, module, x_q, z_ann, partner, relu)(x_q)
        elif all(sides[0].env[a] is sides[1].env[a] for a in node.all_input_nodes):
            # the same inputs on both sides (before the first ReLU call): run it once
            sides[0].env[node] = sides[1].env[node] = sides[0].run_node(node)
        else:
            for side in sides:
                side.env[node] = side.run_node(node)
        for arg in node.all_input_nodes:
            users_left[arg] -= 1
            if users_left[arg] == 0:
                for side in sides:
                    side.env.pop(arg, None)
    return outputs



def shares_storage(value, envs, model_storage) -> bool:
    """Whether ``value`` is not a plain tensor, or its memory is the model's or that of
    another value still held in ``envs`` (a view of it, say)."""
    if not isinstance(value, torch.Tensor) or value.requires_grad:
        return True
    ptr = value.untyped_storage().data_ptr()
    if ptr in model_storage:
        return True
    return any(isinstance(v, torch.Tensor) and v is not value
               and v.untyped_storage().data_ptr() == ptr
               for env in envs for v in env.values())


def feeds_probe(node: fx.Node, modules: dict) -> bool:
    """Whether ``node``'s only user is a ReLU call (a :class:`Probe`)."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    return user.op == "call_module" and isinstance(modules.get(user.target), Probe)


def residual_partner(node: fx.Node):
    """The other addend when ``node``'s only user is a two-term ``add`` (a residual sum such as
    ``conv2(...) + identity``), else ``None``. A refitted layer there is fitted to the ANN's sum
    minus the quantised network's other addend, so it also absorbs the shortcut's error."""
    if len(node.users) != 1:
        return None
    user = next(iter(node.users))
    if (user.op not in ("call_function", "call_method") or user.target not in ADDS
            or user.kwargs or len(user.args) != 2):
        return None
    other = [a for a in user.args if a is not node]
    return other[0] if len(other) == 1 and isinstance(other[0], fx.Node) else None


def kl_divergence(log_p_ref: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p_ref ‖ softmax(logits)) over dim 1, averaged over samples (differentiable)."""
    log_q = torch.log_softmax(logits, dim=1)
    return (log_p_ref.exp() * (log_p_ref - log_q)).sum(1).mean()


def kl(log_p_ref: torch.Tensor, logits: torch.Tensor) -> float:
    """:func:`kl_divergence` as a number."""
    return float(kl_divergence(log_p_ref, logits))

