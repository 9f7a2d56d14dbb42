"""The built-in projectors."""

from mmkit import hookimpl
from mmkit.specs import ProjectorSpec


@hookimpl
def mmkit_projectors():
    return [
        ProjectorSpec(name="linear", build="mmkit.modeling.projectors:LinearProjector",
                      description="one Linear per token (LAMM)"),
        ProjectorSpec(name="mlp", build="mmkit.modeling.projectors:MLPProjector",
                      description="Linear-GELU-Linear (LLaVA-1.5); option depth"),
        ProjectorSpec(name="resampler", build="mmkit.modeling.projectors:ResamplerProjector",
                      description="learned queries + cross-attention (mPLUG-Owl visual abstractor); "
                                  "options num_queries, num_layers, num_heads"),
    ]
