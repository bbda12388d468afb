"""The paired graph of :meth:`S2HModel.forward_pair`: one fx graph computing (soft, hard) outputs."""
from __future__ import annotations

import operator

import torch
from torch import nn

from .attention import S2H_ATTENTION_TYPES
from .layers import S2H_LAYER_TYPES

__all__ = ["PAIR_LEAVES", "build_pair_graph"]

PAIR_LEAVES = S2H_LAYER_TYPES + S2H_ATTENTION_TYPES  # layers with a forward_pair


class _PairTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, PAIR_LEAVES) or super().is_leaf_module(m, qualname)


def build_pair_graph(model: nn.Module) -> torch.fx.GraphModule:
    """An fx graph computing (soft, hard): S2H layers -> forward_pair, every other op twice."""
    graph = _PairTracer().trace(model)
    new = torch.fx.Graph()
    env_s: dict = {}
    env_h: dict = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            p = new.node_copy(node)
            env_s[node] = env_h[node] = p
        elif node.op == "output":
            out_s = torch.fx.map_arg(node.args[0], lambda n: env_s[n])
            out_h = torch.fx.map_arg(node.args[0], lambda n: env_h[n])
            new.output((out_s, out_h))
        elif node.op == "call_module" and isinstance(model.get_submodule(node.target), PAIR_LEAVES):
            if len(node.args) != 1 or node.kwargs:
                raise RuntimeError(f"S2H layer '{node.target}' is called with more than one input")
            (arg,) = node.args
            mod = new.get_attr(node.target)
            pair = new.call_method("forward_pair", (mod, env_s[arg], env_h[arg]))
            env_s[node] = new.call_function(operator.getitem, (pair, 0))
            env_h[node] = new.call_function(operator.getitem, (pair, 1))
        else:
            inputs = node.all_input_nodes
            if all(env_s[n] is env_h[n] for n in inputs) and node.op == "get_attr":
                c = new.node_copy(node, lambda n: env_s[n])
                env_s[node] = env_h[node] = c
            else:
                env_s[node] = new.node_copy(node, lambda n: env_s[n])
                env_h[node] = new.node_copy(node, lambda n: env_h[n])
    new.lint()
    return torch.fx.GraphModule(model, new)


