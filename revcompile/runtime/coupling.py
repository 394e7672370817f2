"""The additive coupling and the call helpers, under their original import path.

They live in `revcompile.runtime.couplings` (one file per family); converted models
pickled before the move, and code that imports from here, keep working.
"""

from revcompile.runtime.couplings.additive import AdditiveCoupling as AdditiveCoupling
from revcompile.runtime.couplings.base import Call as Call
from revcompile.runtime.couplings.base import Carry as Carry
from revcompile.runtime.couplings.base import Recorder as Recorder
from revcompile.runtime.couplings.base import keyed_call as keyed_call
from revcompile.runtime.couplings.base import plain_call as plain_call
from revcompile.runtime.couplings.vjp import Branch as Branch
