import json
import posixpath

from snakemake.utils import min_version, validate

min_version("9.0")

# Fills in schema defaults, and stops with the offending key named on a wrong type or unknown key.
validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]
BBBC021_PLATES = config["bbbc021"]["plates"] if "bbbc021" in DATASETS else []

wildcard_constraints:
    plate=r"Week[0-9]+_[0-9]+",


def mirror_urls(dataset, filename):
    """Shell arguments `--url U1 --url U2 ...` for one file at every configured mirror."""
    urls = (posixpath.join(base, filename) for base in config[dataset]["base_urls"])
    return " ".join(f"--url '{url}'" for url in urls)


def download_args():
    d = config["download"]
    return f"--retries {d['retries']} --backoff {d['backoff_seconds']} --timeout {d['timeout_seconds']}"


def all_targets():
    targets = []
    if "bbbc021" in DATASETS:
        targets.append("results/bbbc021/crops/index.parquet")
        if config["preprocess"]["bbbc021"]["illumination"]["compute"]:
            targets += expand("results/bbbc021/illumination/{plate}.png", plate=BBBC021_PLATES)
    if "bbbc014" in DATASETS:
        targets.append("results/bbbc014/crops/index.parquet")
    return targets
