# Snakemake script of the extraction rules. The images go to a folder beside the declared output (the
# receipt), so Snakemake never deletes a good extraction before a rerun: a new one is staged, checked,
# and only then swapped in. The size limits are read from the config here (not params): they cannot
# change what a verified extraction holds.
import json

from moaflow.datasets import download
from moaflow.logs import log_file, one_line_errors

config, params, inputs = snakemake.config, snakemake.params, snakemake.input  # noqa: F821 - from Snakemake
limits = {"max_bytes": int(config["download"]["max_extracted_gb"] * 2**30),
          "max_pixels": int(config["download"]["max_image_megapixels"] * 1e6)}
with open(inputs.archive) as handle:
    archive_sha256 = json.load(handle)["sha256"]
with log_file(snakemake.log[0]) as log, one_line_errors(f"extract {params.archive}", log):  # noqa: F821
    if params.dataset == "bbbc021":
        manifest = download.extract_bbbc021_plate(params.archive, params.target, image_csv=params.image_csv,
                                                  plate=params.member_root, archive_sha256=archive_sha256,
                                                  log=log, **limits)
    else:
        manifest = download.extract_bbbc014_images(params.archive, params.target, member_root=params.member_root,
                                                   expected_count=params.expected_count,
                                                   archive_sha256=archive_sha256, log=log, **limits)
    download.write_receipt(manifest, snakemake.output[0], f"{params.target}/{download.EXTRACT_MANIFEST}")  # noqa: F821
