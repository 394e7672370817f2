"""revcompile: compile residual PyTorch models into reversible networks."""

from revcompile.api import analyze as analyze
from revcompile.api import convert as convert
from revcompile.calibrate import Calibration as Calibration
from revcompile.calibrate import calibrate as calibrate
from revcompile.errors import ConversionError as ConversionError
from revcompile.errors import DoubleBackwardError as DoubleBackwardError
from revcompile.errors import ReconstructionError as ReconstructionError
from revcompile.errors import RevCompileError as RevCompileError
from revcompile.errors import TraceError as TraceError
from revcompile.passes.ir import Plan as Plan
from revcompile.runtime.check import check_reconstruction as check_reconstruction
from revcompile.runtime.coupling import AdditiveCoupling as AdditiveCoupling
from revcompile.runtime.couplings import FAMILIES as FAMILIES
from revcompile.runtime.couplings import (
    ReconstructionWarning as ReconstructionWarning,
)
from revcompile.runtime.mode import storing_activations as storing_activations
from revcompile.runtime.stage import ReversibleStage as ReversibleStage

__version__ = "0.1.0"
