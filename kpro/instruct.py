"""`kpro.instruct`, Bitune's instruction-tuning module before Bitune became one package: every name it had is
in `kpro.bitune`, so the old name is that module itself, whether reached as `kpro.instruct`, by
`import kpro.instruct` or by `from kpro.instruct import tune`."""
import sys

from . import bitune

sys.modules[__name__] = bitune  # the import system hands out what this name maps to once the module has run
