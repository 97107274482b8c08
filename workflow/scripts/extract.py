# The extraction rules' script. The images go to a folder beside the declared output (the receipt), so
# Snakemake never deletes a good extraction before a rerun: a new one is staged, checked, and only then
# swapped in. The size limits are read from the config here (not params): they cannot change what a
# verified extraction holds. By hand: `moaflow extract-bbbc021` / `moaflow extract-bbbc014`.
from moaflow.steps import run_job

run_job(snakemake, {"settings": snakemake.config["download"]})  # noqa: F821 - provided by Snakemake
