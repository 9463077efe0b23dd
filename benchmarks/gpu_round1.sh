#!/usr/bin/env bash
# Round 1 on one GPU: environment, CUDA tests, patch parity, memory patches,
# and step throughput of dense-125m / nam-125m beside the HF Llama peer.
source benchmarks/gpu_session.sh
set -o pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 - <<'PY' | tee $OUT/env.txt
import importlib
for m in ["torch", "triton", "pyarrow", "tokenizers", "safetensors", "tensorboard", "matplotlib", "tqdm",
          "transformers", "liger_kernel", "torchao", "tomli_w", "pytest", "hypothesis", "numpy"]:
    try:
        mod = importlib.import_module(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(m, "MISSING", type(e).__name__)
PY
timeout 120 python3 -m megacpp patches check --device cuda 2>&1 | tee $OUT/patches_check.txt
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/model/test_model_gpu.py 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
timeout 200 python3 benchmarks/memory_patches.py --json $OUT/memory_patches.json 2>&1 | tee $OUT/memory_patches.txt
for r in dense-125m nam-125m; do
  timeout 420 python3 -m megacpp bench --recipe $r --steps 10 --json > $OUT/bench_$r.json 2> $OUT/bench_$r.err
  echo "bench $r rc=$?"; tail -n 3 $OUT/bench_$r.err
  python3 -c "import json,sys; d=json.load(open('$OUT/bench_$r.json')); print(d['recipe'], round(d['tokens_per_s']), round((d['mfu'] or 0)*100,1), round(d['peak_memory_gib'],1), {k: round(v,1) for k,v in d['family_ms'].items()})" 2>/dev/null
done
timeout 300 python3 benchmarks/hf_llama_peer.py --recipe dense-125m --json $OUT/hf_llama.json 2>&1 | tail -n 2
