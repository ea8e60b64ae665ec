"""Exports to the tools people run models with on their own machines (llama.cpp, Ollama, LM Studio).

    export_model_gguf("smollm2-135m", ["out/demo/adapter-best"], "dates.gguf", qtype="q8_0")
    export_adapter_gguf("out/demo/adapter-best", "dates-lora.gguf")      # llama.cpp's --lora file
    write_modelfile("dates.gguf", adapter=None, tokenizer=tok)           # Ollama's Modelfile

`gguf_arch` knows the architectures llama.cpp runs and how their tensors are named and laid out,
`gguf_vocab` the tokenizer metadata, `gguf_write` the tensor encodings and the atomic file write;
`gguf_model` and `gguf_adapter` put them together. docs/export.md is the user's guide.
"""
