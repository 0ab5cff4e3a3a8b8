#!/usr/bin/env bash
# The prepared GPU measurement of issue 25, for a session that is lent a GPU.
#
#   bash tools/gpu_session.sh prepare     here, before the lease: wheels the GPU image lacks
#                                         (DeepSpeed and what it needs beyond the image) and
#                                         nanoGPT's model.py for the reference loop, in .gpu/
#   bash tools/gpu_session.sh run [MODELS [DEADLINE_S]]
#                                         on the device (carry .gpu): installs them unless a warm
#                                         machine has them, prints the versions, runs
#                                         tools/gpu_bench.py on MODELS (default all), writing
#                                         into $OUT/benchmarks
#
# One call of the device tool runs at most 600 s, and a session has about 15 minutes of device
# time, the machine's start included. The plan is two calls, back to back on the warm machine:
#   1. command "bash tools/gpu_session.sh run gpt2 300", carry [".gpu"], timeout_s 380
#   2. copy $OUT's benchmarks/* into docs/benchmarks/ here (the second call adds its rows to
#      that file, which the working tree carries), then
#      command "bash tools/gpu_session.sh run gpt2-medium,gpt2-xl 150", carry [".gpu"], timeout_s 220
# Then copy $OUT's benchmarks/* into docs/benchmarks/, commit them, and give the machine back.
# The second number is the deadline in seconds from the script's start (gpu_bench's --deadline-s gets
# what is left after the install): no row or timing round starts after it.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  prepare)
    mkdir -p .gpu/wheels .gpu/nanogpt
    # The image's python is 3.12 and has torch, numpy, tqdm, psutil, ninja, einops, msgpack,
    # py-cpuinfo, tiktoken and pyyaml; DeepSpeed itself, hjson and pydantic are missing.
    pip download --quiet --no-deps -d .gpu/wheels "deepspeed==0.19.8" hjson
    pip download --quiet --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 -d .gpu/wheels pydantic
    cp ../shared/peers/nanogpt/model.py .gpu/nanogpt/model.py
    du -sh .gpu
    ;;
  run)
    start=$(date +%s)
    if ! python3 -c "import deepspeed" 2>/dev/null; then
      python3 -m pip install --quiet --no-index --find-links .gpu/wheels --no-build-isolation "deepspeed==0.19.8"
    fi
    python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
    echo "install: $(( $(date +%s) - start )) s"
    models="${2:-gpt2,gpt2-medium,gpt2-xl}"
    out="${OUT:-/tmp/gpu_bench_out}/benchmarks"
    # Written straight into $OUT after every timing round, so a call killed at its limit still
    # brings back what it measured; an earlier call's file (carried in docs/benchmarks) is added to.
    mkdir -p "$out" && cp -r docs/benchmarks/. "$out/" 2>/dev/null || true
    # The deadline counts from this script's start (the install and imports included), and the
    # output is unbuffered all along: a call killed at its limit still shows and logs its last lines.
    # The log keeps everything; the console drops DeepSpeed's [INFO] lines, not its warnings or errors.
    left=$(( ${3:-300} - ($(date +%s) - start) ))
    PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" python3 tools/gpu_bench.py --reference .gpu/nanogpt/model.py \
        --models "$models" --deadline-s "$(( left > 60 ? left : 60 ))" --out-dir "$out" 2>&1 \
        | tee "$out/../gpu_bench.log" | grep --line-buffered -v "^\[20[^]]*\] \[INFO\]" || true
    echo "total: $(( $(date +%s) - start )) s"
    ;;
  *)
    echo "usage: bash tools/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
