#!/usr/bin/env bash
# SLURM batch script: N nodes x 4 GPUs, one process per node, all 4 local GPUs
# per process (JAX reads the coordinator, rank and process count from SLURM;
# uccl_jax.parallel.initialize_distributed starts jax.distributed).
#
# Usage (the node count is the only thing to change; flags go to uccl_jax.main):
#   sbatch --nodes=2 launch/slurm.sh --config=configs/cityscapes.py:1_8 --workdir=runs/cs_1_8
# The global batch (train.batch_size) is split over nodes x 4 GPUs; the
# paper's recipe (batch 8 = 2 per GPU x 4 GPUs) is one node.
# A preempted or time-limited job gets SIGTERM 120 s before the end
# (--signal below): every process saves a checkpoint and exits; submit the same
# command again to resume from it.
#SBATCH --job-name=uccl_jax
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=%x-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-.}"
if [[ -f .venv/bin/activate ]]; then
  # shellcheck disable=SC1091
  source .venv/bin/activate
fi

# One task per node; JAX's SLURM cluster detection assigns the ranks.
# `exec srun` so that SLURM's SIGTERM reaches the training processes.
exec srun --kill-on-bad-exit=1 python -m uccl_jax.main "$@"
