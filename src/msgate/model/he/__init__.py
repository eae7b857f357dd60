"""Homomorphic (CKKS) evaluation of the patient ensemble's EHR branch and the fusion's EHR term.

One module per job: :mod:`~msgate.model.he.params` (CKKS parameters, security limits, contexts),
:mod:`~msgate.model.he.circuit` (the trained members in evaluation form), :mod:`~msgate.model.he.packing`
(slot layouts: several cases and several members per ciphertext), :mod:`~msgate.model.he.evaluator`
(the encrypted evaluation a worker runs) and :mod:`~msgate.model.he.equivalence` (HE against the
plaintext ensemble; ``msgate evaluate --he``). The key service is :mod:`msgate.model.he_keys`, the
worker side :mod:`msgate.model.he_worker`. Nothing here imports torch or TenSEAL at import time.
"""

from msgate.model.he.circuit import Array, HeMember, HeModel, export, export_member, with_bias
from msgate.model.he.equivalence import random_model, synthetic_inputs, torch_logits
from msgate.model.he.evaluator import Evaluator
from msgate.model.he.packing import (
    COST_MS,
    Layout,
    choose_width,
    lane_groups,
    lane_pattern,
    make_layout,
    max_pack,
    offset_patterns,
    pack_cost,
    pack_inputs,
    readout_patterns,
    shift_pattern,
    unpack_outputs,
    weight_patterns,
)
from msgate.model.he.params import (
    DEFAULT_COEFF_BITS,
    DEFAULT_N,
    DEFAULT_SCALE_BITS,
    MAX_COEFF_BITS,
    HeParamError,
    HeParams,
    chain_primes,
    make_context,
)

__all__ = [
    "COST_MS", "DEFAULT_COEFF_BITS", "DEFAULT_N", "DEFAULT_SCALE_BITS", "MAX_COEFF_BITS", "Array", "Evaluator",
    "HeMember", "HeModel", "HeParamError", "HeParams", "Layout", "chain_primes", "choose_width", "export",
    "export_member", "lane_groups", "lane_pattern", "make_context", "make_layout", "max_pack", "offset_patterns",
    "pack_cost", "pack_inputs", "random_model", "readout_patterns", "shift_pattern", "synthetic_inputs",
    "torch_logits", "unpack_outputs", "weight_patterns", "with_bias",
]
