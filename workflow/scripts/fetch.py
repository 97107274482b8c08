# The download rules' script. The download settings and mirrors are read from the config here rather than
# passed as params: they cannot change a file's content, and a params change makes Snakemake redo the job.
# The data sits beside the declared output (its receipt), so no rerun deletes it; a rerun re-verifies it
# and transfers nothing. By hand: `moaflow fetch`.
from moaflow.steps import run_job

config = snakemake.config  # noqa: F821 - provided by Snakemake
section = snakemake.params.section  # noqa: F821 - the mirrors' section: bbbc021, or (crops, <name>, download)
for key in [section] if isinstance(section, str) else section:
    config = config[key]
run_job(snakemake, {"base_urls": config["base_urls"],  # noqa: F821
                    "settings": snakemake.config["download"]}, not_arguments=("section",))  # noqa: F821
