"""Random-weight GGUF models that llama.cpp and the native helper load: the tests' tiny float targets of every
architecture, and the benchmarks' full-size quantized targets and drafters (bench/shapes.py).

`vocab` is the synthetic tokenizer, `weights` writes tensors (float, or random quantized blocks streamed to the
file), `targets` and `drafters` lay out the models.
"""
