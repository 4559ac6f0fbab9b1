"""The system layer: processes, devices, files and errors, below everything else."""
