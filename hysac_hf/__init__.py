"""hysac-hf: HySAC (Hyperbolic Safety-Aware CLIP) as a Hugging Face model.

The model, config and processor classes live in ``modeling/`` (shipped to the Hub as remote code) and are
re-exported here; this package adds training, data, evaluation, calibration and the command line.
"""

from .modeling.configuration_hysac import HySACConfig
from .modeling.modeling_hysac import HySACModel, HySACOutput
from .modeling.processing_hysac import HySACProcessor

__version__ = "0.1.0"
__all__ = ["HySACConfig", "HySACModel", "HySACOutput", "HySACProcessor", "__version__"]
