#!/bin/bash
# Stage 3 (quality tuning on curated pairs) on 4 nodes x 8 GPUs. Submit from the repository root:
#   sbatch cluster/stage3_4nodes.sh
#   sbatch --nodes=2 --time=2:00:00 --partition=gpu cluster/stage3_4nodes.sh
#   PARA_TRAIN_RUN_DIR=/shared/runs/exp1 PARA_TRAIN_OVERRIDES="train.lr=1e-4" sbatch cluster/stage3_4nodes.sh
# Every setting, the preemption path and where logs go are described in cluster/launch.sh.
#SBATCH --job-name=para-stage3
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=08:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=cluster/logs/%x-%j.out
set -euo pipefail
# sbatch runs a copy of this file, so find the checkout from where it was submitted.
exec bash "${PARA_TRAIN_HOME:-$SLURM_SUBMIT_DIR}/cluster/launch.sh" batch 3 configs/stage3_quality.yaml
