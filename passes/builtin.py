"""Importing this module registers every built-in pass (``passes.infra.registered_passes`` does)."""
from passes import (  # noqa: F401  (registration)
    canonicalize,
    dynamic_quant,
    exclude,
    gps,
    insert_qdq,
    observe,
    os_plus,
    quarot,
    quantize,
    regions,
    repq,
    shift_sum,
    smooth,
    stwq,
    svdquant,
    sym_shift,
)
