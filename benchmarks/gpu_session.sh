#!/usr/bin/env bash
# Every GPU measurement of the repo in one command (a lent H100/H200 has 15 minutes in all):
#   bash benchmarks/gpu_session.sh OUT_DIR [FASHION_MNIST_DIR]
# 1. backend exactness on CUDA, 2. train-step sweep eager, 3. time to accuracy on Fashion-MNIST (3 seeds),
# 4. train-step sweep compiled (grouped and global). Each step writes its output to OUT_DIR as it goes; a failing
# step does not stop the next.
out=${1:?usage: gpu_session.sh OUT_DIR [FASHION_MNIST_DIR]}
data=${2:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} > "$out/device.txt" 2>&1
cat "$out/device.txt"
python3 benchmarks/cuda_checks.py 2>&1 | tee "$out/cuda_checks.txt"
python3 benchmarks/train_step.py --sweep h100 --markdown --time-budget 150 --json "$out/train_step_eager.json" \
  2>"$out/train_step_eager.log" | tee "$out/train_step_eager.md"
if [ -n "$data" ]; then
  python3 benchmarks/time_to_accuracy.py --seeds 0 1 2 --set "data.root=$data" --json "$out/time_to_accuracy.json" \
    2>"$out/time_to_accuracy.log" | tee "$out/time_to_accuracy.md"
fi
python3 benchmarks/train_step.py --sweep h100 --compile default --backends grouped --markdown --time-budget 150 \
  --json "$out/train_step_compiled.json" 2>"$out/train_step_compiled.log" | tee "$out/train_step_compiled.md"
