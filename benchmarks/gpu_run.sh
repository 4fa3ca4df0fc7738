#!/usr/bin/env bash
# One command for whoever has a CUDA GPU for a few minutes: the CUDA exactness tests, then benchmarks/gpu.py, each
# under its own timeout, every line printed as it is measured (so a timeout still leaves the cells done so far).
#
#   bash benchmarks/gpu_run.sh [arguments for benchmarks/gpu.py, e.g. --bandwidth-gbs 4800 on an H200]
#
# TESTS_TIMEOUT (default 240 s) and BENCH_TIMEOUT (default 600 s) bound the two parts.
set -u
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available())"
timeout "${TESTS_TIMEOUT:-240}" python -m pytest -q -rs tests/test_gpu.py
tests=$?
timeout "${BENCH_TIMEOUT:-600}" python -u benchmarks/gpu.py "$@"
bench=$?
echo "tests exit ${tests} | benchmark exit ${bench} (124: its timeout)"
[ "${tests}" -eq 0 ] && [ "${bench}" -eq 0 ]
