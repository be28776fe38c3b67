#!/usr/bin/env bash
# BYOL on one node: torchrun starts one training process per GPU (NCCL), e.g. 1 node x 8 GPUs:
#
#   tools/torchrun_1node.sh configs/imagenet_r50_dali.yaml data.path=/data/imagenet/train
#
# Everything after the config is a key=value override, as for `fastbyol train`.
# data.batch_size is the GLOBAL batch (4096 = 8 x 512); the lr follows it (optim.base_lr x batch / 256).
# Environment:
#   NPROC             processes (GPUs) to use; default: every GPU nvidia-smi lists
#   OMP_NUM_THREADS   CPU threads per process for torch's CPU ops (torchrun's default: 1)
#   PYTHON            the interpreter with fastbyol installed (default: python)
# Stop with Ctrl-C (or SIGTERM to torchrun): the ranks agree to stop at the next log step,
# rank 0 writes a checkpoint, and the same command resumes the run (train.resume=auto).
# CPU smoke test (gloo, 2 processes): NPROC=2 tools/torchrun_1node.sh configs/quickstart.yaml train.max_steps=5
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [key=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
PYTHON=${PYTHON:-python}

if [ -z "${NPROC:-}" ]; then
    NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    if [ "$NPROC" -lt 1 ]; then
        echo "$0: no GPU found by nvidia-smi; set NPROC (e.g. NPROC=2 for a CPU run with train.device=cpu)" >&2
        exit 2
    fi
fi

# --standalone: a private rendezvous on this host with a free port (no MASTER_ADDR/PORT to pick)
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" \
    -m fastbyol train "$CONFIG" "$@"
