#!/bin/bash
# One GPU session's checks, in priority order, each under its own timeout; everything lands in $OUT.
#   here:  python benchmarks/pack_shards.py pack data/prep/128/manifest.json <dir>/pack --per-speaker 20
#   there: cd <dir> && OUT=<results> bash benchmarks/gpu_check.sh     (<dir>: this package, tests/, benchmarks/,
#          pack/, and whl/ with the wheels the machine lacks: pydantic, pydantic-core, pydantic-settings, ...)
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
L=$OUT/log.txt
stamp() { echo "== $(date +%T) $*" >>"$L"; }
stamp start
[ -d whl ] && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl >>"$L" 2>&1
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,clocks.sm --format=csv -lms 250 >"$OUT/smi.csv" 2>&1 &
SMI=$!
{ nvidia-smi -L; nproc; python3 -c "import torch, sys; print(torch.__version__, torch.cuda.get_device_name(), sys.version.split()[0]); torch.cuda.utilization(); print('nvml ok')"; } >>"$L" 2>&1
python3 benchmarks/pack_shards.py unpack pack /tmp/prep >>"$L" 2>&1
M=/tmp/prep/manifest.json
stamp "1 one training step of every model on CUDA (32, bf16, 16)"
LIPSYNC_TINY_PREP=$M timeout 150 python3 -m pytest -q -p no:cacheprovider -k cuda tests/test_train_devices.py >"$OUT/pytest.txt" 2>&1
stamp "pytest rc $?"
stamp "2 lipsync train --model render --gpus 1, then --resume"
export LIPSYNC_OUTPUT_DIR=/tmp/o
{ timeout 60 python3 -m lipsync_cli.cli train --model render --gpus 1 --manifest $M --max-steps 30 --val-every 15 --save-every 15 --batch-size 16
  echo "rc $?"
  timeout 45 python3 -m lipsync_cli.cli train --model render --gpus 1 --manifest $M --max-steps 45 --val-every 15 --save-every 15 --batch-size 16 --resume
  echo "rc $?"; } >"$OUT/train_render.txt" 2>&1
stamp "3 samples/s per model and precision at the models' batch sizes"
S="python3 benchmarks/train_speed.py --devices cuda --manifest $M --seconds 5"
timeout 190 $S --model sync,lips,render,seed --precisions 32,bf16,16 --out "$OUT/speed.json" >"$OUT/speed.txt" 2>&1
stamp "speed rc $?"
stamp "4 bigger batches, channels-last, torch.compile"
{ timeout 60 $S --model sync --precisions 32,bf16 --batch-size 512 --out /tmp/s1.json
  timeout 80 $S --model render,seed --precisions bf16 --batch-size 32 --variants base,channels_last --out /tmp/s2.json
  timeout 120 $S --model sync,lips --precisions bf16 --variants compile --out /tmp/s3.json
  python3 -c "import json,sys; json.dump([json.load(open(f)) for f in sys.argv[1:]], open('$OUT/speed_more.json','w'), indent=1)" /tmp/s1.json /tmp/s2.json /tmp/s3.json
} >"$OUT/speed_more.txt" 2>&1
stamp "more rc $?"
kill $SMI
stamp done
