"""Importing this module registers every built-in pass (``passes.infra.registered_passes`` does)."""
from passes import (  # noqa: F401  (registration)
    brecq,
    canonicalize,
    dynamic_quant,
    exclude,
    gps,
    insert_qdq,
    observe,
    omniquant,
    os_plus,
    quantize,
    regions,
    shift_sum,
    smooth,
    stwq,
    sym_shift,
)
