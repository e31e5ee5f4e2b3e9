"""kpro.convert: models from other formats into kpro and the Hugging Face layout.

    gguf_file.py       read a GGUF file: metadata, tensors, dequantisation (F32, F16, BF16, Q8_0, Q4_0, Q4_1
                       by kpro's own code; other types the `gguf` package can dequantise)
    gguf_llama.py      a llama.cpp LLaMA as kpro's: config from metadata, tensor names, q/k un-permuted;
                       from_gguf (a model in memory) and convert_gguf (an HF-layout directory, tensor by tensor)
    gguf_tokenizer.py  the GGUF vocabulary as tokenizer.json (byte-level BPE) or tokenizer.model (SentencePiece),
                       with tokenizer_config.json and its chat template
    command.py         `python -m kpro convert-gguf FILE OUT`

Reading GGUF needs the optional packages `gguf` and `tokenizers`: `pip install 'kpro[gguf]'`.
"""
from .gguf_file import GGUFError
from .gguf_llama import convert_gguf, from_gguf, gguf_config
from .gguf_tokenizer import tokenizer_files

__all__ = ["GGUFError", "convert_gguf", "from_gguf", "gguf_config", "tokenizer_files"]
