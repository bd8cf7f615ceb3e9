"""Graph passes over torch.fx GraphModules and the infrastructure that runs them."""
from passes.infra import (
    Pass,
    PassContext,
    PassManager,
    PassResult,
    Site,
    format_pipeline,
    parse_pipeline,
    register,
)

__all__ = ["Pass", "PassContext", "PassManager", "PassResult", "Site", "format_pipeline", "parse_pipeline", "register"]
