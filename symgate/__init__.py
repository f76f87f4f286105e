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
