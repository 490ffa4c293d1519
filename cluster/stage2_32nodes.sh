#!/bin/bash
# Stage 2 (alignment: LoRA on the LLM + UNet) on 32 nodes x 8 GPUs. Submit from the repository root:
#   sbatch cluster/stage2_32nodes.sh
#   sbatch --nodes=16 --time=2:00:00 --partition=gpu cluster/stage2_32nodes.sh
#   PARA_TRAIN_RUN_DIR=/shared/runs/exp1 PARA_TRAIN_OVERRIDES="train.lr=1e-4" sbatch cluster/stage2_32nodes.sh
# Every setting, the preemption path and where logs go are described in cluster/launch.sh.
#SBATCH --job-name=para-stage2
#SBATCH --nodes=32
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
exec bash "${PARA_TRAIN_HOME:-$SLURM_SUBMIT_DIR}/cluster/launch.sh" batch 2 configs/stage2_alignment.yaml
