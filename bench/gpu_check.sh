#!/usr/bin/env bash
# The accelerator check as one command (about 11 minutes on one H100/H200; a device call may
# run 10, so split it with ONLY, a list of step names):
#   bash bench/gpu_check.sh      (logs under $OUT, or ./gpu_check/ when OUT is unset)
#   ONLY="devices attention mfu_flash mfu_xla canon" bash bench/gpu_check.sh
#   ONLY="mfu_mdm mfu_block generate" bash bench/gpu_check.sh
# 1. the devices JAX sees; 2. FlashAttention (Pallas GPU) against the XLA attention: agreement
# and speed at the Dhara-70M attention shape; 3. tokens/s and MFU of the Dhara-70M AR config
# with each attention kernel; 4. the Canon conv kernels' GB/s; 5. the mdm and block-diffusion
# train steps' tokens/s and MFU on that config; 6. decoding: KV-cached AR against the block-cached
# diffusion sampler at 1, 2, 4 and 10 tokens per forward, batch 1, 8 and 64, on Dhara-70M's shape
# (random weights: a fixed-schedule step costs the same whatever the weights). The bench scripts need only jax,
# flax, optax, numpy, pyyaml and safetensors (no dataset, tokenizer or install of this repo);
# checked at toy sizes on CPU with jax 0.10.2 and with jax 0.11.2 + flax 0.12.12 (Python 3.12).
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: runs it with a time limit, logs to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  if [[ -n "${ONLY:-}" && " $ONLY " != *" $name "* ]]; then return; fi
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
  echo "== $name: exit ${PIPESTATUS[0]}"
}

step devices 60 "$python" -c "import jax; print(jax.__version__, jax.devices())"
step attention 120 "$python" bench/attention_kernel.py --batch 8 64
step mfu_flash 150 "$python" bench/train_mfu.py --steps 10 model.attention_impl=pallas_gpu
step mfu_xla 150 "$python" bench/train_mfu.py --steps 10 model.attention_impl=xla
step canon 90 "$python" bench/canon_kernel.py --batch 8 64 --dtype bfloat16
# 5. the diffusion objectives' train steps on the same config (block counts its 2L tokens).
step mfu_mdm 150 "$python" bench/train_mfu.py --steps 10 train.objective=mdm \
  model.attention=bidirectional model.mask_token_id=50256
step mfu_block 150 "$python" bench/train_mfu.py --steps 10 train.objective=block \
  train.block_size=32 model.mask_token_id=50256
# 6. generation speed at Dhara-70M's shape (G = 100, block 20; see bench/generate_speed.py).
step generate 240 "$python" bench/generate_speed.py --batches 1,8,64 --new-tokens 100 --block 20
