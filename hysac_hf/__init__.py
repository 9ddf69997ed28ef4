"""hysac-hf: HySAC (Hyperbolic Safety-Aware CLIP) as a Hugging Face model.

The model, config and processor classes live in ``modeling/`` (shipped to the Hub as remote code) and are
re-exported here; this package adds training, data, evaluation, calibration and the command line.
"""

# With hysac_hf imported, the Auto classes know "hysac" without remote code (and never prompt for it).
from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .modeling.configuration_hysac import HySACConfig
from .modeling.modeling_hysac import HySACModel, HySACOutput
from .modeling.processing_hysac import HySACProcessor

AutoConfig.register("hysac", HySACConfig, exist_ok=True)
AutoModel.register(HySACConfig, HySACModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(HySACConfig, HySACModel, exist_ok=True)
AutoProcessor.register(HySACConfig, HySACProcessor, exist_ok=True)


def _register_pipelines() -> None:
    """Make `pipeline("unsafe-content-detection" | "safe-retrieval", model=<a HySACModel object>, processor=...)` work
    with hysac_hf imported (a saved folder declares them in `config.custom_pipelines` for `trust_remote_code`)."""
    from transformers import pipelines

    from .modeling.pipeline_hysac import (
        DETECTION_TASK,
        RETRIEVAL_TASK,
        SafeRetrievalPipeline,
        UnsafeContentDetectionPipeline,
    )

    for task, pipeline_class in (
        (DETECTION_TASK, UnsafeContentDetectionPipeline),
        (RETRIEVAL_TASK, SafeRetrievalPipeline),
    ):
        pipelines.PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class=pipeline_class, pt_model=AutoModel, type="multimodal"
        )


_register_pipelines()

__version__ = "0.1.0"
__all__ = ["HySACConfig", "HySACModel", "HySACOutput", "HySACProcessor", "__version__"]
