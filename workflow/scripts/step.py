# The script of every other rule: run the step its params name (moaflow.steps), with the rule's named
# inputs, outputs and params as the step function's keyword arguments. By hand: `moaflow <step> --help`.
from moaflow.steps import run_job

run_job(snakemake)  # noqa: F821 - provided by Snakemake
