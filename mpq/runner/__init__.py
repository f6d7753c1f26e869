"""The infrastructure every stage stands on: config, run directory, atomic files, progress, the resumable
sharded-work helper and torchrun ranks. Nothing here imports a stage or a command."""
