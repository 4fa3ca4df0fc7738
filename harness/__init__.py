"""kvbench.harness. Importing it registers the lm-eval model name `kvbench` (lazily: see lm_eval_registration)."""

from kvbench.harness.lm_eval_registration import register as _register_lm_eval_model

_register_lm_eval_model()
