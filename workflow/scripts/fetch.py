# Snakemake script of the download rules. The download settings (mirrors, retries, timeouts) are read
# from the config here rather than passed as params: they cannot change a file's content, and a params
# change makes Snakemake delete and redo an output. The data file sits beside the declared output (its
# receipt), so no rerun deletes it; a rerun re-verifies it and transfers nothing.
from moaflow.datasets import download
from moaflow.logs import log_file, one_line_errors

config, params = snakemake.config, snakemake.params  # noqa: F821 - provided by Snakemake
section = config[params.section]
with log_file(snakemake.log[0]) as log, one_line_errors(f"download {params.filename}", log):  # noqa: F821
    receipt = download.fetch_published(
        params.filename, params.data, base_urls=section["base_urls"], settings=config["download"],
        published=section.get("published_files", {}).get(params.filename), kind=params.kind, log=log)
    download.write_receipt(receipt, snakemake.output[0], params.data)  # noqa: F821
