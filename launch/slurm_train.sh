#!/usr/bin/env bash
# LoRA-drop on a SLURM cluster: one torchrun per node, ranks rendezvous on the first node.
#   sbatch --nodes 4 launch/slurm_train.sh recipes/llama3_70b_loradrop.yaml [dotted.key=value ...]
# Adjust the #SBATCH lines (partition, GPUs per node, time) for your cluster.
#SBATCH --job-name=loradrop
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch launch/slurm_train.sh RECIPE.yaml [dotted.key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
mkdir -p logs
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
srun --kill-on-bad-exit=1 bash -c "
  .venv/bin/torchrun --nnodes $SLURM_NNODES --nproc_per_node $GPUS_PER_NODE \
    --rdzv_backend c10d --rdzv_endpoint $MASTER_ADDR:$MASTER_PORT \
    --rdzv_id $SLURM_JOB_ID \
    launch/train.py --config $RECIPE $*
"
