"""The runner: config, run directory, stage registry, atomic files, progress, the resumable sharded-work helper,
torchrun ranks and launcher, the CLI."""
