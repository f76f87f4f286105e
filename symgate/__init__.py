"""symgate: exact Jacobians, effective learning rates and kernels for gated RNN cells."""
from ._cell import Cell as Cell, Constant as Constant, Input as Input, Matrix as Matrix
from ._cell import Scalar as Scalar, State as State, Vector as Vector
from ._cell import cell as cell, make_cell as make_cell
from ._functions import exp as exp, log as log, sigmoid as sigmoid, softplus as softplus, tanh as tanh
from ._errors import *  # noqa: F401,F403
from . import cells as cells
from ._derive import jacobian as jacobian, parameter_jacobian as parameter_jacobian
from ._derive import parameter_jacobians as parameter_jacobians
from ._reference import ReferenceKernel as ReferenceKernel, reference_kernel as reference_kernel
from ._reference import Trajectory as Trajectory, Gradients as Gradients
from . import losses as losses
from . import testing as testing
from ._derive._expansion import Expansion as Expansion, EffectiveLR as EffectiveLR, Split as Split
from ._derive._expansion import effective_lr as effective_lr, expansion as expansion, split as split
from ._derive._expansion import ell as ell, t as t
from ._transport import EffectiveLRTrajectory as EffectiveLRTrajectory, JacobianProducts as JacobianProducts
from ._transport import decoupled as decoupled, effective_lrs as effective_lrs
from ._transport import lag_weighted_gradients as lag_weighted_gradients, per_lag_gradients as per_lag_gradients
from . import analogies as analogies
from ._compiled import CompiledKernel as CompiledKernel, compile as compile, kernels as kernels
from ._build import BuildError as BuildError, CompilerNotFoundError as CompilerNotFoundError, SymgateWarning as SymgateWarning
