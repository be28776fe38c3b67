#!/usr/bin/env bash
# BYOL on several nodes with torchrun's c10d rendezvous, e.g. 4 nodes x 8 GPUs = 32 processes.
# Run the SAME command on every node (in any order, within the rendezvous timeout):
#
#   MASTER_ADDR=node001 tools/torchrun_multinode.sh configs/imagenet_r50_dali.yaml data.path=/data/imagenet/train
#
# MASTER_ADDR is the host of the rendezvous store: one of the participating nodes, spelled as that
# node knows itself (its `hostname` or an IP it owns), reachable from all of them on MASTER_PORT.
# The global batch (data.batch_size, 4096) is split over NNODES x NPROC ranks (4096 / 32 = 128 each);
# it must divide evenly. The run directory (train.run_dir) and the data must be on storage every
# node sees: rank 0 writes checkpoints, every rank reads them back to resume.
# Environment:
#   MASTER_ADDR   rendezvous host (required)
#   MASTER_PORT   rendezvous port (default 29500; free on MASTER_ADDR)
#   NNODES        nodes (default 4); NPROC: processes per node (default 8)
#   RDZV_ID       a job id shared by the nodes of one run (default fastbyol-$USER)
#   PYTHON        the interpreter with fastbyol installed (default: python)
# NCCL picks the network itself; on clusters with several interfaces set e.g. NCCL_SOCKET_IFNAME=ib0
# (and NCCL_DEBUG=INFO to see what it chose).
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: MASTER_ADDR=HOST $0 CONFIG [key=value ...]" >&2
    exit 2
fi
: "${MASTER_ADDR:?set MASTER_ADDR to the host of the rendezvous (one of the nodes)}"
CONFIG=$1
shift
PYTHON=${PYTHON:-python}
NNODES=${NNODES:-4}
NPROC=${NPROC:-8}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-fastbyol-${USER:-run}}

exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    -m fastbyol train "$CONFIG" "$@"
