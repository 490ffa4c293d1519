#!/bin/bash
# Stage 1 (pretrain the UNet, LLM frozen) on 64 nodes x 8 GPUs. Submit from the repository root:
#   sbatch cluster/stage1_64nodes.sh
#   sbatch --nodes=32 --time=2:00:00 --partition=gpu cluster/stage1_64nodes.sh
#   PARA_TRAIN_RUN_DIR=/shared/runs/exp1 PARA_TRAIN_OVERRIDES="train.lr=1e-4" sbatch cluster/stage1_64nodes.sh
# Every setting, the preemption path and where logs go are described in cluster/launch.sh.
#SBATCH --job-name=para-stage1
#SBATCH --nodes=64
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --open-mode=append
#SBATCH --output=cluster/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file, so find the checkout from where it was submitted.
exec bash "${PARA_TRAIN_HOME:-$SLURM_SUBMIT_DIR}/cluster/launch.sh" batch 1 configs/stage1_pretrain.yaml
