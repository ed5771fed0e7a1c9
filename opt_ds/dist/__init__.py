"""Processes: the process group (`process`), how ranks find each other under srun / mpirun / deepspeed
(`launch`), and Slurm host lists (`hostfile`)."""
