"""Reading and writing Hugging Face model directories, and checkpoint naming per architecture."""

from evomerge.models.architectures import ARCHITECTURES, Architecture, architecture_for
from evomerge.models.io import ModelDir, ModelWriter, check_finite, live_param, load_live_model

__all__ = ["ARCHITECTURES", "Architecture", "ModelDir", "ModelWriter", "architecture_for", "check_finite", "live_param",
           "load_live_model"]
