"""lm-evaluation-harness: `adapter.KVBenchLM` (an HFLM whose requests go through kvbench's compressed cache),
its lazy registration as lm-eval model `kvbench` (`registration`), `kvbench lm-eval` (`run`) and lm-eval's own
command line with the model registered (`cli`).
"""
