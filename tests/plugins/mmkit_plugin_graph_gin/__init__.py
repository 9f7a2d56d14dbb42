"""A third-party-style graph modality (contract 1.1, variable size): GIN on torch-geometric.

One token per node: a graph of 5 nodes takes 5 prompt slots, one of 9 takes 9. The plugin is what
a third-party author would write (tests register it in-process; a real one names this module in a
``mmkit`` entry point): the hooks below import no torch, everything heavy is a lazy reference.

- ``io.load_graph``: a ``.json`` file ``{"x": [[features] per node], "edge_index": [[sources],
  [targets]]}`` -> numpy arrays, checked (JSON is safe to read; no pickle).
- ``encoder.GINEncoder``: ``preprocess`` -> ``torch_geometric.data.Data``, ``collate`` =
  ``Batch.from_data_list``, ``num_tokens_for`` = the node count, ``forward`` -> ``RaggedFeatures``.
- ``demo.build_demo``: "Is this graph a ring or a star?" over graphs of 4 to 9 nodes.
"""

from __future__ import annotations

from mmkit import DemoSpec, EncoderSpec, MarkerSpec, ModalitySpec, hookimpl

MODALITY = "graph"


@hookimpl
def mmkit_modalities() -> list[ModalitySpec]:
    return [ModalitySpec(
        name=MODALITY, data_keys=("graph",), markers=MarkerSpec("<graph>", begin="<Graph>", end="</Graph>"),
        load="mmkit_plugin_graph_gin.io:load_graph", encoder="gin", projector="mlp", file_types=(".json",),
        demo=DemoSpec(build="mmkit_plugin_graph_gin.demo:build_demo", description="rings and stars of 4-9 nodes"),
        description="graphs (JSON nodes + edges) through a GIN, one token per node")]


@hookimpl
def mmkit_encoders() -> list[EncoderSpec]:
    return [EncoderSpec(name="gin", modality=MODALITY, build="mmkit_plugin_graph_gin.encoder:GINEncoder.build",
                        tiny={"in_dim": 4, "hidden": 16, "num_layers": 2},
                        description="GIN layers (torch_geometric.nn.GINConv), one feature row per node")]
