"""kpro.integrations: optional bridges between kpro and other ecosystems. `import kpro` never imports this
package; each bridge imports the library it bridges to when it is imported itself.

    hf.py   kpro's ops inside a Hugging Face `transformers` LLaMA-family model: `apply(model)` (RMSNorm, SwiGLU
            MLP, and attention registered as attn_implementation="kpro"), `train_only(model, block_ids)`
"""
