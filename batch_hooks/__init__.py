"""Batch-system hooks (Slurm, HTCondor): short-lived commands that ask dynvm for a VM of the job's VO."""
