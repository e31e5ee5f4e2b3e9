"""`kpro.instruct`, Bitune's instruction-tuning module before Bitune became one package: every name it had is
in `kpro.bitune`, so the old name is that module itself, whether reached as `kpro.instruct`, by
`import kpro.instruct` or by `from kpro.instruct import tune`; its submodules are kpro.bitune's
(`import kpro.instruct.evaluation` is `kpro.bitune.evaluation`)."""
import importlib
import pkgutil
import sys

from . import bitune

sys.modules[__name__] = bitune  # the import system hands out what this name maps to once the module has run
# Without these, `import kpro.instruct.evaluation` found evaluation.py in bitune's folder and ran it again as a
# second module, with its own classes (a kpro.Bitune was not its Bitune), and bound it as kpro.bitune.evaluation.
for _sub in pkgutil.iter_modules(bitune.__path__):
    sys.modules[f"{__name__}.{_sub.name}"] = importlib.import_module(f"{bitune.__name__}.{_sub.name}")
