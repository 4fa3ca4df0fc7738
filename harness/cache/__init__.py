"""The one seam (DESIGN §3): the compressed cache every method fills and the attention that reads it.

`kv_cache.KVBenchCache` is a transformers `Cache`: per layer a compressed context prefix in a method's
representation (`prefix`, `quantized_prefix`, `latent_prefix`) and an uncompressed tail; `attention` is the
function registered with `transformers.AttentionInterface` that attends over both; `batched` lets several
such caches decode in one forward pass. A new cache representation goes here, and nowhere else.
"""

from kvbench.harness.moved import forward_names as _forward_names

# The flat layout's `kvbench.harness.cache` module is `kvbench.harness.cache.kv_cache` now: its names still resolve here.
__getattr__ = _forward_names(__name__, "kvbench.harness.cache.kv_cache")
