"""Derivation: local partials (SymPy), structured Jacobians (structural chain rule)."""
from ._jacobian import (
    ORIGINS as ORIGINS,
    BlockJacobian as BlockJacobian,
    Factor as Factor,
    ParamJacobian as ParamJacobian,
    StructuredJacobian as StructuredJacobian,
    Term as Term,
    explicit_node_values as explicit_node_values,
    explicit_update as explicit_update,
    jacobian as jacobian,
    parameter_jacobian as parameter_jacobian,
    parameter_jacobians as parameter_jacobians,
)
from ._local import LocalPartials as LocalPartials, local_partials as local_partials
from ._matexpr import UnitCol as UnitCol, UnitDiag as UnitDiag
