r"""Graph passes every framework's TPP networks need, on ``torch.fx`` graphs.

* :func:`delay_depths` / :func:`longest_delay`: in delayed streaming each TPP layer delays its
  stream by one window; how many windows late each value is, and the most on any path
  (``steps_needed = (L + 1)·T``).
* :func:`align_delays`: where branches of different delay meet (a residual add), delay the
  earlier ones so that every op combines the same window of each branch.
* :func:`pair_max_pools`: the max-pools a TPP neuron can absorb. A neuron that has its whole
  window can max-pool window potentials; exact-count rounding is monotone, so it commutes with
  the max (``docs/design.md``, fact 9).

The passes know nothing of a framework: the caller says what delays (``delay_of``), what a
max-pool is and which nodes are transparent (scalers around a neuron).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

__all__ = ["delay_depths", "longest_delay", "align_delays", "pair_max_pools"]


def delay_depths(gm: fx.GraphModule, delay_of: Callable[[nn.Module], int]) -> dict:
    """Windows of delay of each node's value: the sum of ``delay_of(module)`` over the modules on
    the longest path from an input to it; ``None`` for values that do not depend on an input
    (constants, parameters)."""
    modules = dict(gm.named_modules())
    depth: dict = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            depth[node] = 0
            continue
        found = [depth[a] for a in node.all_input_nodes if depth[a] is not None]
        d = max(found) if found else None
        if d is not None and node.op == "call_module":
            d += delay_of(modules[node.target])
        depth[node] = d
    return depth


def longest_delay(net: nn.Module, delay_of: Callable[[nn.Module], int]) -> int:
    """The most windows of delay on one path through ``net``: along its graph for an
    ``fx.GraphModule`` (or a module ``torch.fx`` can trace), else — an ``nn.Sequential`` or an
    untraceable module — ``delay_of(net)``, every delaying module as in a chain (``delay_of``
    counts a module's submodules too)."""
    if not isinstance(net, fx.GraphModule) and not isinstance(net, nn.Sequential):
        try:
            net = fx.symbolic_trace(net)
        except Exception:  # noqa: BLE001 - not traceable: take it for a chain
            pass
    if isinstance(net, fx.GraphModule):
        return max((d for d in delay_depths(net, delay_of).values() if d is not None),
                   default=0)
    return delay_of(net)


def align_delays(gm: fx.GraphModule, delay_of: Callable[[nn.Module], int],
                 make_delay: Callable[[int], nn.Module], stem: str = "window_delay") -> int:
    """Insert ``make_delay(windows)`` on every input of a multi-input node that is fewer windows
    late than its latest input (in place; the graph is linted and recompiled when changed).

    ``delay_of`` must count the inserted modules' windows too (it is re-read as the pass goes).

    :return: the number of delays inserted
    """
    depth = delay_depths(gm, delay_of)
    inserted = 0
    for node in list(gm.graph.nodes):
        timed = [a for a in node.all_input_nodes if depth[a] is not None]
        if len(timed) < 2:
            continue
        latest = max(depth[a] for a in timed)
        for arg in timed:
            if depth[arg] == latest:
                continue
            name = f"{stem}_{inserted}"
            while hasattr(gm, name):
                inserted += 1
                name = f"{stem}_{inserted}"
            gm.add_submodule(name, make_delay(latest - depth[arg]))
            with gm.graph.inserting_before(node):
                delay = gm.graph.call_module(name, args=(arg,))
            node.replace_input_with(arg, delay)
            depth[delay] = latest
            inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted


def pair_max_pools(neurons, is_max_pool: Callable[[fx.Node], bool],
                   transparent: Callable[[fx.Node], bool] = lambda node: False) -> dict:
    """``{neuron node: [max-pool nodes]}``: for each neuron (or activation) node, the max-pool
    that feeds it and the one it feeds, in graph order, where a neuron can take them over.

    A max-pool *before* the neuron is taken when it feeds nothing else (through ``transparent``
    nodes, e.g. a scaler, each with one user); one *after* it when the neuron's output (through
    transparent nodes) feeds nothing else. A max-pool is given to one neuron at most.

    :param neurons: the neuron or activation nodes, in graph order
    :param is_max_pool: whether a node is a max-pool
    :param transparent: whether a node lies between a neuron and its max-pool without changing
        the pairing (elementwise and per channel: it commutes with the max of a positive scale)
    """
    paired, taken = {}, set()
    for neuron in neurons:
        pools = []
        before = neuron.args[0] if neuron.args else None
        while (isinstance(before, fx.Node) and transparent(before) and len(before.users) == 1
               and before.args and isinstance(before.args[0], fx.Node)):
            before = before.args[0]
        if (isinstance(before, fx.Node) and before is not neuron and is_max_pool(before)
                and len(before.users) == 1 and before not in taken):
            pools.append(before)
        after = neuron
        while len(after.users) == 1 and transparent(next(iter(after.users))):
            after = next(iter(after.users))
        users = list(after.users)
        if len(users) == 1 and is_max_pool(users[0]) and users[0] not in taken \
                and users[0].args[0] is after:
            pools.append(users[0])
        if pools:
            paired[neuron] = pools
            taken.update(pools)
    return paired
