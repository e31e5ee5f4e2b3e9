"""kpro.integrations: optional bridges between kpro and other ecosystems. `import kpro` never imports this
package; each bridge imports the library it bridges to when it is imported itself.

    hf.py   kpro's ops inside a Hugging Face `transformers` LLaMA-family model: `apply(model)` (RMSNorm, SwiGLU
            MLP, and attention registered as attn_implementation="kpro"), `train_only(model, block_ids)`
"""

import importlib


def __getattr__(name: str):
    """`kpro.integrations.hf` after a plain `import kpro` (SPEC.md's spelling): each bridge is imported, with the
    library it bridges to, on its first use, so importing this package still imports none of them."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise  # the bridged library is missing: say which
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = module
    return module
