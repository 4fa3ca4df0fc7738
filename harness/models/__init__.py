"""Models: loading the embedded GGUF, a Hugging Face id or a local directory (`loading`), and the on-disk copy
of dequantized GGUF weights that makes later loads fast (`gguf_cache`). What a model family needs in order
to be served exactly is checked here, before its weights load.
"""

from kvbench.harness.moved import forward_names as _forward_names

# The names `--device` and `--dtype` take (checked before torch is imported; CUDA itself when the model loads).
DEVICES = ("auto", "cpu", "cuda")
DTYPE_NAMES = ("float32", "bfloat16", "float16")

# The flat layout's `kvbench.harness.models` module is `kvbench.harness.models.loading` now: its names still resolve here.
__getattr__ = _forward_names(__name__, "kvbench.harness.models.loading")
