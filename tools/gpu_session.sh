#!/usr/bin/env bash
# The prepared GPU measurement of issue 25, for a session that is lent a GPU.
#
#   bash tools/gpu_session.sh prepare     here, before the lease: wheels the GPU image lacks
#                                         (DeepSpeed and what it needs beyond the image) and
#                                         nanoGPT's model.py for the reference loop, in .gpu/
#   bash tools/gpu_session.sh run         on the device (carry .gpu): installs them, prints the
#                                         versions, runs tools/gpu_bench.py into $OUT
#
# The device tool's call: command "bash tools/gpu_session.sh run", carry [".gpu"], timeout_s 580.
# Then copy $OUT/benchmarks/* into docs/benchmarks/ and commit them.
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
    python3 -m pip install --quiet --no-index --find-links .gpu/wheels --no-build-isolation "deepspeed==0.19.8"
    python3 -c "import torch, triton, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'deepspeed', deepspeed.__version__, torch.cuda.get_device_name())"
    echo "install: $(( $(date +%s) - start )) s"
    out="${OUT:-docs/benchmarks}/benchmarks"
    # No new model group after 360 s, so the whole call stays inside the device's 600 s.
    PYTHONPATH="$PWD" python3 tools/gpu_bench.py --reference .gpu/nanogpt/model.py --budget-s 360 \
        --out-dir "$out" 2>&1 | grep -v "^\[20" | tee "${OUT:-/tmp}/gpu_bench.log" | tail -60
    echo "total: $(( $(date +%s) - start )) s"
    ;;
  *)
    echo "usage: bash tools/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
