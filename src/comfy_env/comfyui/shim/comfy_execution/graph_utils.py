"""Stand-in for comfy_execution/graph_utils.py: building the subgraph a node expands into.

A node returns ``{"result": ..., "expand": graph}`` (V1) or
``io.NodeOutput(..., expand=graph)`` (V3), the graph built with :class:`GraphBuilder`.
The host runs that graph, so what this module produces is an interface with ComfyUI
0.33 and must match it exactly: node ids are ``"{root}.{call_index}.{graph_index}."``
followed by the builder's own id (comfy-env sets the host's root and call index in the
worker before each call, see ``worker_side._set_graph_prefix``), a link is the list
``[node_id, output_index]``, and a node serialises as ``{"class_type", "inputs"}``
plus ``"override_display_id"`` when set.  An :class:`ExecutionBlocker` a node returns
is rebuilt in the host as ComfyUI's own (same module and class name, same state).

Written for comfy-env from that interface (ComfyUI's source is GPL; this is not a copy).
"""
from __future__ import annotations

__all__ = ["is_link", "GraphBuilder", "Node", "add_graph_prefix", "ExecutionBlocker"]


def is_link(obj) -> bool:
    """Whether ``obj`` is an input that names another node's output: ``[id, index]``."""
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], str)
            and isinstance(obj[1], (int, float)))


class Node:
    """One node of a graph being built: its id (prefix included), class and inputs."""

    def __init__(self, id, class_type, inputs):
        self.id = id
        self.class_type = class_type
        self.inputs = inputs
        self.override_display_id = None

    def out(self, index):
        """A link to this node's output ``index``, to pass as another node's input."""
        return [self.id, index]

    def set_input(self, key, value):
        """Set an input; None removes it."""
        if value is None:
            self.inputs.pop(key, None)
        else:
            self.inputs[key] = value

    def get_input(self, key):
        return self.inputs.get(key)

    def set_override_display_id(self, override_display_id):
        self.override_display_id = override_display_id

    def serialize(self):
        out = {"class_type": self.class_type, "inputs": self.inputs}
        if self.override_display_id is not None:
            out["override_display_id"] = self.override_display_id
        return out


class GraphBuilder:
    """Builds a graph in the form ComfyUI's executor expands.

    Each builder made without a ``prefix`` takes the next graph index under the default
    root and call index (class state, as in ComfyUI: the host sets them per node call).
    """
    _default_prefix_root = ""
    _default_prefix_call_index = 0
    _default_prefix_graph_index = 0

    def __init__(self, prefix=None):
        self.prefix = GraphBuilder.alloc_prefix() if prefix is None else prefix
        self.nodes = {}
        self.id_gen = 1

    @classmethod
    def set_default_prefix(cls, prefix_root, call_index, graph_index=0):
        cls._default_prefix_root = prefix_root
        cls._default_prefix_call_index = call_index
        cls._default_prefix_graph_index = graph_index

    @classmethod
    def alloc_prefix(cls, root=None, call_index=None, graph_index=None):
        """The next free prefix ``"{root}.{call_index}.{graph_index}."`` (each call takes
        a new graph index, whichever arguments it was given)."""
        root = GraphBuilder._default_prefix_root if root is None else root
        call_index = GraphBuilder._default_prefix_call_index if call_index is None else call_index
        graph_index = GraphBuilder._default_prefix_graph_index if graph_index is None else graph_index
        GraphBuilder._default_prefix_graph_index += 1
        return f"{root}.{call_index}.{graph_index}."

    def node(self, class_type, id=None, **kwargs):
        """A node of ``class_type`` with ``kwargs`` as inputs; the existing one when ``id``
        (without the prefix) is taken already."""
        if id is None:
            id = str(self.id_gen)
            self.id_gen += 1
        full = self.prefix + id
        node = self.nodes.get(full)
        if node is None:
            node = self.nodes[full] = Node(full, class_type, kwargs)
        return node

    def lookup_node(self, id):
        return self.nodes.get(self.prefix + id)

    def finalize(self):
        """The graph: node id -> serialised node."""
        return {node_id: node.serialize() for node_id, node in self.nodes.items()}

    def replace_node_output(self, node_id, index, new_value):
        """Every input linked to output ``index`` of ``node_id`` gets ``new_value``
        instead (None: the input is removed)."""
        target = self.prefix + node_id
        for node in self.nodes.values():
            for key, value in list(node.inputs.items()):
                if is_link(value) and value[0] == target and value[1] == index:
                    if new_value is None:
                        del node.inputs[key]
                    else:
                        node.inputs[key] = new_value

    def remove_node(self, id):
        del self.nodes[self.prefix + id]


def add_graph_prefix(graph, outputs, prefix):
    """``graph`` (serialised) and its ``outputs`` with every node id, and every link
    between them, prefixed by ``prefix``; returns ``(graph, outputs as a tuple)``."""
    def relink(value):
        return [prefix + value[0], value[1]] if is_link(value) else value

    new_graph = {}
    for node_id, info in graph.items():
        new_graph[prefix + node_id] = {"class_type": info["class_type"],
                                       "inputs": {k: relink(v) for k, v in info.get("inputs", {}).items()}}
    return new_graph, tuple(relink(o) for o in outputs)


class ExecutionBlocker:
    """Returned as an output (or in place of a V3 node's output), it blocks the nodes
    that use it in the host: with ``message`` as their error, or silently when None."""

    def __init__(self, message):
        self.message = message
