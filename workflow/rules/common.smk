import csv
import hashlib
import json

from snakemake.utils import min_version, validate

from moaflow.study import BBBC021_CHANNELS, resolve_plates

min_version("9.0")

# Fills in schema defaults, and stops with the offending key named on a wrong type or unknown key.
validate(config, schema="../schemas/config.schema.yaml")

DATASETS = config["datasets"]
# Tags every MLflow run: which configuration produced it.
CONFIG_HASH = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
BBBC021_PLATES = resolve_plates(config["bbbc021"]["plates"]) if "bbbc021" in DATASETS else []
BBBC021_IMAGE_CSV = f"results/bbbc021/raw/{config['bbbc021']['image_csv']}"
BBBC021_MOA_CSV = f"results/bbbc021/raw/{config['bbbc021']['moa_csv']}"
# The bbbc014 settings that decide the well table (mirrors and file names do not).
BBBC014_TABLE_KEYS = ["filename_regex", "dapi_channel", "cell_lines", "positive_columns", "negative_columns"]

wildcard_constraints:
    plate=r"Week[0-9]+_[0-9]+",


def verified(path):
    """The receipt a download or extraction step writes beside its data (its declared output)."""
    return f"{path}.verified.json"


def data_of(receipt):
    """The data a receipt describes: `verified`'s inverse."""
    return str(receipt).removesuffix(".verified.json")


TRAIN = config["training"]
INITS = {i["name"]: i["weights"] for i in TRAIN["initialisations"]}


def fold_names(dataset):
    with open(TRAIN[dataset]["folds_file"]) as handle:
        return [row["fold"] for row in csv.DictReader(handle, delimiter="\t")]


def trained_architectures(dataset):
    """training.<dataset>.architectures when given, else training.architectures."""
    return TRAIN[dataset].get("architectures") or TRAIN["architectures"]


def input_size(wildcards):
    size = TRAIN[wildcards.dataset]["input_sizes"][wildcards.architecture]
    available = config["preprocess"][wildcards.dataset]["input_sizes"]
    if size not in available:
        raise ValueError(
            f"training.{wildcards.dataset}.input_sizes.{wildcards.architecture} = {size} "
            f"is not among preprocess.{wildcards.dataset}.input_sizes {available}"
        )
    return size


def training_runs(dataset):
    return expand(
        "results/{dataset}/models/{architecture}/{init}/seed-{seed}/{fold}",
        dataset=dataset,
        architecture=trained_architectures(dataset),
        init=INITS,
        seed=TRAIN["seeds"],
        fold=fold_names(dataset),
    )


def deviation_settings():
    """The parts of the config that the deviations-from-the-paper table compares."""
    training = {k: v for k, v in TRAIN.items() if k not in ("resources", "seeds")}
    return {
        "bbbc021": {"base_urls": config["bbbc021"]["base_urls"]},
        "preprocess": {"bbbc021": config["preprocess"]["bbbc021"]},
        "training": training,
    }


def all_targets():
    targets = []
    if "bbbc021" in DATASETS:
        targets.append("results/bbbc021/crops/index.parquet")
        if config["preprocess"]["bbbc021"]["illumination"]["compute"]:
            targets += expand("results/bbbc021/illumination/{plate}.png", plate=BBBC021_PLATES)
    if "bbbc014" in DATASETS:
        targets.append("results/bbbc014/crops/index.parquet")
    targets += [f"results/{ds}/evaluation/summary.json" for ds in DATASETS]
    targets.append("results/mlflow/runs.json")
    return targets
