import csv
import functools
import hashlib
import json
import os
import shlex
from importlib import resources

from snakemake.utils import min_version, validate

from moaflow.learn.folds import dataset_folds
from moaflow.datasets.tables import crops_table
from moaflow.analysis.profiling import CONTROL_NORMALISATIONS
from moaflow.study import (
    BBBC021_CHANNELS,
    BBBC021_STORED_ORDER,
    architecture_settings,
    hyperparameter_schema_path,
    resolve_plates,
)

min_version("9.0")

# Fills in schema defaults, and stops with the offending key named on a wrong type or unknown key.
validate(config, schema="../schemas/config.schema.yaml")
# The shipped config/config.yaml is the base that --configfile files are layered on; the rules read its
# dataset sections even when a run trains only on a crops dataset.
for _section in ("bbbc021", "bbbc014"):
    if _section not in config:
        raise ValueError(
            f"config: no {_section!r} section. The Snakefile reads config/config.yaml from the working directory "
            f"({os.getcwd()}) and layers --configfile files on top; copy moaflow's config/config.yaml there "
            "(README: 'From scratch space')")
# Hyper-parameter overrides against their one source, moaflow's own schema (no defaults filled: the preset decides).
for _dataset in ("bbbc021", "bbbc014"):
    if _dataset in config["training"]:
        _section = config["training"][_dataset]
        for _overrides in [_section["hyperparameters"]] + [
            v.get("hyperparameters", {}) for v in _section["per_architecture"].values()
        ]:
            validate(_overrides, hyperparameter_schema_path(), set_default=False)

DATASETS = config["datasets"]
# Pre-cropped image sets (config `crops:`) that this run trains on.
CROPS = {name: spec for name, spec in config["crops"].items() if name in DATASETS}
for _name in DATASETS:
    if _name not in ("bbbc021", "bbbc014") and _name not in config["crops"]:
        raise ValueError(f"datasets: {_name!r} is neither bbbc021, bbbc014 nor a key of the config's crops section")
    for _section in ("training", "preprocess"):
        if _name in CROPS and _name not in config[_section]:
            raise ValueError(f"{_section}.{_name}: missing; a crops dataset needs its own {_section} section")
# Datasets classified by mechanism of action (evaluated alike); BBBC014 is a translocation yes/no.
MOA_DATASETS = [d for d in DATASETS if d != "bbbc014"]


def normalises_to_controls():
    """profiling.normalisation dmso_*: profiles normalised to each plate's DMSO crops."""
    return config["profiling"]["enabled"] and config["profiling"]["normalisation"] in CONTROL_NORMALISATIONS


# Normalising profiles to DMSO needs DMSO crops, which only BBBC021's plates have (crops sets hold treatments).
if normalises_to_controls():
    for _name in MOA_DATASETS:
        if _name in CROPS:
            raise ValueError(
                f"profiling.normalisation: {config['profiling']['normalisation']!r} normalises profiles to each "
                f"plate's DMSO crops, and the crops dataset {_name!r} has none; set profiling.normalisation to "
                "none or standardize for it")
# Tags every MLflow run: which configuration produced it.
CONFIG_HASH = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:12]
BBBC021_PLATES = resolve_plates(config["bbbc021"]["plates"]) if "bbbc021" in DATASETS else []
BBBC021_IMAGE_CSV = f"results/bbbc021/raw/{config['bbbc021']['image_csv']}"
BBBC021_MOA_CSV = f"results/bbbc021/raw/{config['bbbc021']['moa_csv']}"
# The bbbc014 settings that decide the well table (mirrors and file names do not).
BBBC014_TABLE_KEYS = ["filename_regex", "dapi_channel", "cell_lines", "positive_columns", "negative_columns"]

wildcard_constraints:
    plate=r"Week[0-9]+_[0-9]+",


# The authors' own treatment-level predictions (pharmbio/kensert_CNN, MIT), shipped with moaflow.
PUBLISHED_PREDICTIONS = shlex.quote(str(resources.files("moaflow") / "data" / "kensert2019_predictions.csv"))
PUBLISHED_ARCHITECTURES = ["resnet50", "inception_v3", "inception_resnet_v2"]


def verified(path):
    """The receipt a download or extraction step writes beside its data (its declared output)."""
    return f"{path}.verified.json"


def data_of(receipt):
    """The data a receipt describes: `verified`'s inverse."""
    return str(receipt).removesuffix(".verified.json")


TRAIN = config["training"]
INITS = {i["name"]: i["weights"] for i in TRAIN["initialisations"]}


# Files that ship with the workflow are found through the workflow's own location, so it runs from any
# working directory (--directory) or as a module; the user's config and results stay in the working directory.
SHIPPED_FOLDS = {ds: workflow.source_path(f"../../config/folds/{ds}.tsv") for ds in ("bbbc021", "bbbc014")}


def folds_file(dataset):
    """training.<dataset>.folds_file, the folds shipped with the workflow, or a crops dataset's generated folds."""
    if TRAIN[dataset]["folds_file"]:
        return TRAIN[dataset]["folds_file"]
    if dataset in CROPS:
        return f"results/{dataset}/folds.generated.tsv"
    return SHIPPED_FOLDS[dataset]


# Only what decides a crops table's content: a change elsewhere (the channels' display names) redoes nothing.
CROPS_TABLE_KEYS = ["images", "metadata", "separator", "filename", "columns", "batch_pattern"]


def crops_settings(name):
    """A params function giving the table-deciding part of a crops dataset's config section as JSON."""
    return lambda wildcards: json.dumps({k: CROPS[name][k] for k in CROPS_TABLE_KEYS if k in CROPS[name]},
                                        sort_keys=True)


@functools.cache
def fold_names(dataset):
    if dataset in CROPS and not TRAIN[dataset]["folds_file"]:
        # Generated folds are known at parse time from the local metadata, by the function the rule runs.
        spec, settings = CROPS[dataset], TRAIN[dataset]["folds"]
        table = crops_table(spec["images"], spec["metadata"], columns=spec["columns"], filename=spec["filename"],
                            separator=spec["separator"], batch_pattern=spec.get("batch_pattern"),
                            log=lambda _: None)
        return list(dataset_folds(table, variant=settings["variant"], seed=settings["seed"],
                                  validation_compounds=settings["validation_compounds"],
                                  fraction=settings["fraction"])["fold"])
    with open(folds_file(dataset)) as handle:
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


def fold_chunks(dataset):
    """The dataset's folds in groups of training.folds_per_job: chunk name -> fold names."""
    names = fold_names(dataset)
    size = TRAIN["folds_per_job"] or len(names)
    chunks = [names[i : i + size] for i in range(0, len(names), size)]
    return {f"part-{i + 1:02d}-of-{len(chunks):02d}": c for i, c in enumerate(chunks)}


def weights_input(init, architecture):
    """The fetched ImageNet weights file's receipt for an `imagenet` initialisation, else nothing."""
    if INITS[init] == "imagenet" and architecture in config["weights"]["files"]:
        return verified(f"results/weights/{architecture}_notop.h5")
    return []


def store_of(dataset, architecture):
    """The crop store at an architecture's input size."""
    return f"results/{dataset}/crops/{TRAIN[dataset]['input_sizes'][architecture]}.npy"


def imagenet_feature_architectures():
    """Architectures whose untrained ImageNet features are a profiling source (profiling.imagenet_features)."""
    if not config["profiling"]["imagenet_features"]:
        return []
    return [a for a in TRAIN["architectures"] if a in config["weights"]["files"]]


def imagenet_feature_weights(dataset):
    return [
        verified(f"results/weights/{a}_notop.h5")
        for a in imagenet_feature_architectures()
        if a in trained_architectures(dataset)
    ]


def control_statistics_files(dataset):
    """Source (architecture/init) -> its DMSO statistics (rule embed_controls), for the seed profiling uses."""
    if not normalises_to_controls():
        return {}
    return {
        f"{a}/{i}": f"results/{dataset}/profiling/controls/{a}/{i}/seed-{TRAIN['seeds'][0]}.npz"
        for a in trained_architectures(dataset)
        for i in INITS
    }


def control_stores(dataset):
    """Architecture -> the DMSO crop store its untrained ImageNet features embed (profiling normalised to DMSO)."""
    if not normalises_to_controls():
        return {}
    return {
        a: f"results/{dataset}/dmso/{TRAIN[dataset]['input_sizes'][a]}.npy"
        for a in imagenet_feature_architectures()
        if a in trained_architectures(dataset)
    }


def training_jobs(dataset):
    return expand(
        "results/{dataset}/models/{architecture}/{init}/seed-{seed}/jobs/{chunk}.json",
        dataset=dataset,
        architecture=trained_architectures(dataset),
        init=INITS,
        seed=TRAIN["seeds"],
        chunk=fold_chunks(dataset),
    )


def training_runs(dataset):
    """Each trained fold's folder (its outputs are written by the training job of its chunk)."""
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
    training = {k: v for k, v in TRAIN.items() if k in ("architectures", "initialisations", "bbbc021")}
    return {"preprocess": config["preprocess"]["bbbc021"], "training": training}


def all_targets():
    targets = []
    if "bbbc021" in DATASETS:
        targets.append("results/bbbc021/crops/index.parquet")
        if config["preprocess"]["bbbc021"]["illumination"]["compute"]:
            targets += expand("results/bbbc021/illumination/{plate}.png", plate=BBBC021_PLATES)
    if "bbbc014" in DATASETS:
        targets.append("results/bbbc014/crops/index.parquet")
    targets += [f"results/{name}/crops/index.parquet" for name in CROPS]
    targets += [f"results/{ds}/evaluation/summary.json" for ds in DATASETS]
    if config["profiling"]["enabled"]:
        targets += [f"results/{ds}/profiling/summary.json" for ds in MOA_DATASETS]
        targets += [
            f"results/{ds}/interpretation/{a}_{i}.png"
            for ds in MOA_DATASETS
            for a in trained_architectures(ds)
            for i in INITS
        ]
    targets.append("results/mlflow/runs.json")
    return targets


as_report = report   # a line may not start with `report(` outside a rule: the parser takes it for the directive


def _study_outputs(dataset):
    """What only the study's own dataset gets: the deviations from the paper and the authors' predictions."""
    if dataset != "bbbc021":
        return {}
    outputs = {
        "settings": "results/bbbc021/evaluation/settings.json",
        "deviations": report(
            "results/bbbc021/evaluation/deviations.csv",
            caption="../report/deviations.rst",
            category="Evaluation",
            subcategory="Summary",
        ),
    }
    if config["evaluation"]["published_predictions"]:
        outputs["published_confusion"] = [
            as_report(
                f"results/bbbc021/evaluation/confusion_treatment_{a}_published.png",
                caption="../report/published.rst",
                category="Evaluation",
                subcategory="Treatment-level confusion (bbbc021)",
                labels={"architecture": a, "init": "published (the authors' predictions)"},
            )
            for a in PUBLISHED_ARCHITECTURES
        ]
    return outputs


def start_live_tracking():
    """Create the parent MLflow run on a tracking server (MLFLOW_TRACKING_URI or tracking.uri = http(s))."""
    from moaflow import tracking

    uri = tracking.resolve_uri(config["tracking"]["uri"])
    if tracking.is_server(uri):
        record = tracking.start_parent(
            uri, config["tracking"]["experiment"], CONFIG_HASH, "results/mlflow/parent.json"
        )
        logger.info(f"MLflow: live logging to {uri}, parent run {record['parent_run_id']}")
