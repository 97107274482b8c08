"""``moaflow`` command line: one sub-command per workflow step, plus the demo and benchmarks.

Each Snakemake rule calls one sub-command (or a script calling the same
functions), so every step can also be run and debugged by hand. This module
only parses arguments and dispatches to the stage modules. Errors in the input
end with exit status 1 and one line naming the file, key or value at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moaflow.logs import USER_ERRORS
from moaflow.study import BBBC021_STORED_ORDER


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, columns = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWSxCOLUMNS, e.g. 1024x1280") from None
    return rows, columns


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: not JSON ({exc})") from None


# Each handler maps parsed arguments onto one stage function; the imports stay inside so that a
# command loads only what it needs (most never import Keras).

def _standin(a):
    from moaflow.devtools import standin

    if a.dataset == "bbbc021":
        standin.write_bbbc021(a.out, n_plates=a.plates, sites=a.sites, dmso_wells=a.dmso_wells, moas=a.moas,
                              compounds_per_moa=a.compounds_per_moa,
                              concentrations_per_compound=a.concentrations_per_compound,
                              shape=a.shape or (1024, 1280), seed=a.seed)
    else:
        standin.write_bbbc014(a.out, shape=a.shape or (1024, 1360), dapi_channel=a.dapi_channel, seed=a.seed)


def _serve(a):
    from moaflow.devtools.serve import serve

    serve(a.root, a.port, ignore_range=a.ignore_range, rate=a.rate)


def _fetch(a):
    from moaflow.datasets import download

    download.fetch(a.url, a.output, retries=a.retries, backoff_seconds=a.backoff, timeout_seconds=a.timeout,
                   verify=download.content_check(a.kind), size=a.bytes, sha256=a.sha256)


def _extract_bbbc021(a):
    from moaflow.datasets import download

    download.extract_bbbc021_plate(a.archive, a.output, image_csv=a.image_csv, plate=a.plate,
                                   max_bytes=int(a.max_gb * 2**30), max_pixels=int(a.max_megapixels * 1e6))


def _extract_bbbc014(a):
    from moaflow.datasets import download

    download.extract_bbbc014_images(a.archive, a.output, member_root=a.member_root,
                                    expected_count=a.expected_images, max_bytes=int(a.max_gb * 2**30),
                                    max_pixels=int(a.max_megapixels * 1e6))


def _table(a):
    from moaflow.datasets import tables

    if a.dataset == "bbbc021":
        tables.write_bbbc021_table(a.image_csv, a.moa_csv, a.image_root, a.output, plates=a.plates,
                                        taxol_rule=not a.no_taxol_rule)
    elif a.dataset == "bbbc014":
        tables.write_bbbc014_table(a.image_root, a.output, settings=a.settings)
    else:
        tables.write_crops_table(a.settings, a.output)


def _illumination(a):
    from moaflow.preprocess import illumination

    illumination.plate_illumination(a.image_csv, a.image_root, a.plate, a.output_dir, filter_size=a.filter_size,
                                    downscale=a.downscale, robust_percentile=a.robust_percentile)


def _preprocess_plate(a):
    from moaflow.preprocess import plates

    plates.preprocess_plate_files(
        a.table, a.plate, a.output_prefix, illumination_dir=a.illumination_dir, sizes=a.sizes,
        grid=tuple(a.grid), normalisation=a.normalisation, percentiles=tuple(a.percentiles),
        empty_threshold=a.empty_threshold, empty_fraction=a.empty_fraction, controls=a.controls)


def _gather(a):
    from moaflow.preprocess import store

    store.gather_plates(a.prefixes, a.sizes, a.output_dir)


def _preprocess_bbbc014(a):
    from moaflow.preprocess import plates

    plates.preprocess_bbbc014_files(a.table, a.output_dir, sizes=a.sizes, grid=tuple(a.grid), minmax=a.minmax)


def _folds(a):
    from moaflow.learn import folds

    folds.write_dataset_folds(a.dataset, a.output, index=a.index, image_csv=a.image_csv, moa_csv=a.moa_csv,
                              validation_compounds=a.validation_compounds, seed=a.seed, variant=a.variant,
                              fraction=a.fraction)


def _preprocess_crops(a):
    from moaflow.preprocess import plates

    plates.preprocess_crops_files(a.table, a.output_dir, sizes=a.sizes)


def _check_folds(a):
    from moaflow.learn import folds

    folds.check_folds_file(a.folds, a.index, a.output)


def _device_environment(gpus: int | None) -> None:
    # Before Keras loads: GPU memory is taken as needed (two local jobs can share a GPU), and a job
    # declared CPU-only (--gpus 0) does not touch a GPU at all.
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def _train(a):
    _device_environment(a.gpus)
    from moaflow import study
    from moaflow.learn import train

    hyper = study.hyperparameters(a.preset, a.architecture, a.hyperparameters or {})
    train.train_job(a.store, a.index, a.folds, a.fold, architecture=a.architecture, weights=a.weights, hyper=hyper,
                    seed=a.seed, models_dir=a.models_dir, checkpoints_dir=a.checkpoints_dir, dataset=a.dataset,
                    init=a.init, gpus=a.gpus or 0, allow_cpu=a.allow_cpu or a.gpus is None,
                    load_into_memory={"auto": "auto", "true": True, "false": False}[a.load_into_memory],
                    checkpoint_minutes=a.checkpoint_minutes, receipt=a.receipt,
                    tracking={"uri": a.tracking_uri, "experiment": a.experiment, "parent_file": a.mlflow_parent},
                    occlusion={"examples": a.occlusion_examples, "grid": a.occlusion_grid})


def _evaluate(a):
    from moaflow.analysis import evaluate

    if a.predictions:
        evaluate.evaluate_external(a.predictions, a.out_dir)
        return
    missing = [f"--{n.replace('_', '-')}" for n in ("models_dir", "folds", "architectures", "inits")
               if not getattr(a, n)]
    if missing:
        raise ValueError(f"evaluate: give --predictions, or {' '.join(missing)}")
    evaluate.evaluate_dataset(a.dataset, a.models_dir, a.folds, a.architectures, a.inits, a.out_dir,
                              seeds=a.seeds, significances=a.significance,
                              settings=json.load(open(a.settings)) if a.settings else None,
                              data_receipt=a.data_receipt, published=a.published)


def _track(a):
    from moaflow import tracking

    tracking.track(a.run_dirs, a.output, tracking_uri=a.tracking_uri, experiment=a.experiment,
                   config_hash=a.config_hash, summaries=a.summaries or [], artifacts=a.artifacts or [],
                   parent_file=a.parent_file, log_models=not a.no_models)


def _pairs(text: str) -> tuple[str, str]:
    name, _, value = text.partition("=")
    if not value:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE")
    return name, value


def _profile(a):
    from moaflow.analysis import profiling

    if a.normalisation in profiling.CONTROL_NORMALISATIONS:
        missing = [f"--{n.replace('_', '-')}" for n in ("controls", "control_index") if not getattr(a, n)]
        if a.imagenet_weights and not a.control_store:
            missing.append("--control-store")
        if missing:
            raise ValueError(f"profile: --normalisation {a.normalisation} needs {' '.join(missing)}")
    profiling.profile_dataset(a.dataset, a.models_root, a.folds, a.index, dict(a.store), a.architectures, a.inits,
                              a.out_dir, seed=a.seed, imagenet_weights=dict(a.imagenet_weights or []),
                              statistic=a.statistic, normalisation=a.normalisation,
                              controls=dict(a.controls or []), control_index_path=a.control_index,
                              control_store_paths=dict(a.control_store or []),
                              sphering_regularisation=a.sphering_regularisation)


def _embed_controls(a):
    _device_environment(a.gpus)
    import pandas as pd

    from moaflow.learn import folds, train
    from moaflow.analysis import profiling
    from moaflow.learn.feeder import open_store

    train.check_devices(a.gpus or 0, a.allow_cpu or a.gpus is None)
    profiling.control_embeddings(a.models_dir, folds.read_folds(a.folds), pd.read_parquet(a.index),
                                 open_store(a.store), a.output, batch_size=a.batch_size)


def _interpret(a):
    from moaflow.analysis import interpretation
    from moaflow.learn.feeder import open_store

    interpretation.interpret_run(a.models_dir, open_store(a.store), a.output, architecture=a.architecture,
                                 per_class=a.per_class, channel_names=a.channels.split(","))


def _bench_preprocess(a):
    from moaflow.devtools import bench

    bench.bench_preprocess(a.out, a.repeats)


def _bench_training(a):
    from moaflow.devtools import bench

    if a.feeder:
        bench.bench_feeder(batch_size=a.batch_size)
    if a.architectures:
        sizes = {name: {"resnet50": 224}.get(name, 299) for name in a.architectures}
        rows = bench.bench_training(a.out, sizes, batch_size=a.batch_size, precision=a.precision, epochs=a.epochs)
        bench.estimate_study(rows, folds_per_job=a.folds_per_job)


def _demo(a):
    from moaflow.devtools import demo

    return demo.run_demo(a.configfile, a.snakefile, a.cores, a.snakemake_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moaflow", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="cores this command may use (BLAS and OpenCV threads); rules pass their `threads`")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, func, help):
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    p = command("standin", _standin, "write a BBBC021- or BBBC014-shaped stand-in dataset")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014"])
    p.add_argument("--out", required=True, help="folder; www/ inside it is what a server exposes")
    p.add_argument("--shape", type=_shape, help="field size ROWSxCOLUMNS (default: the real size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plates", type=int, default=3, help="bbbc021: plates, one per week")
    p.add_argument("--sites", type=int, default=4, help="bbbc021: fields per well")
    p.add_argument("--dmso-wells", type=int, default=6, help="bbbc021: DMSO wells per plate")
    p.add_argument("--moas", nargs="+", help="bbbc021: MoA names (default: all 12)")
    p.add_argument("--compounds-per-moa", type=int, default=2)
    p.add_argument("--concentrations-per-compound", type=int, default=2)
    p.add_argument("--dapi-channel", type=int, default=1, help="bbbc014: which 'Channel N' is DAPI")

    p = command("serve", _serve, "serve a folder over HTTP on 127.0.0.1 (with Range support)")
    p.add_argument("root")
    p.add_argument("--port", type=int, default=8021)
    p.add_argument("--ignore-range", action="store_true", help="behave like a server without Range support")
    p.add_argument("--rate", type=int, help="throttle to about this many bytes/s per response")

    p = command("fetch", _fetch, "download one file, resumable, from mirrors in order, verified")
    p.add_argument("--url", action="append", required=True, help="repeat for each mirror, in order")
    p.add_argument("--output", required=True)
    p.add_argument("--kind", choices=["zip", "image_csv", "moa_csv", "text", "file"], default="file",
                   help="content check: zip CRCs, the BBBC021 CSVs' columns, text, or none (file)")
    p.add_argument("--bytes", type=int, help="the published size, when known")
    p.add_argument("--sha256", help="the published SHA-256, when known")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")

    for name, func, help in (("extract-bbbc021", _extract_bbbc021, "extract and check one BBBC021 plate archive"),
                             ("extract-bbbc014", _extract_bbbc014, "extract and check the BBBC014 image archive")):
        p = command(name, func, help)
        p.add_argument("--archive", required=True)
        p.add_argument("--output", required=True)
        p.add_argument("--max-gb", type=float, default=8.0, help="refuse archives declaring more (uncompressed)")
        p.add_argument("--max-megapixels", type=float, default=16.0, help="refuse larger images")
        if name == "extract-bbbc021":
            p.add_argument("--image-csv", required=True)
            p.add_argument("--plate", required=True)
        else:
            p.add_argument("--member-root", required=True)
            p.add_argument("--expected-images", type=int, required=True)

    p = command("table", _table, "build the per-field (per-crop for a crops dataset) image table of a dataset")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014", "crops"])
    p.add_argument("--image-root", required=True, help="folder of extracted images")
    p.add_argument("--image-csv")
    p.add_argument("--moa-csv")
    p.add_argument("--plates", nargs="+")
    p.add_argument("--no-taxol-rule", action="store_true")
    p.add_argument("--settings", type=_json, help="bbbc014 / crops: the config's section as JSON")
    p.add_argument("--output", required=True, help=".parquet or .csv")

    p = command("illumination", _illumination, "illumination functions of one BBBC021 plate (all its fields)")
    p.add_argument("--image-csv", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--plate", required=True)
    p.add_argument("--filter-size", type=float, required=True)
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--robust-percentile", type=float, default=2.0)
    p.add_argument("--output-dir", required=True)

    p = command("preprocess-plate", _preprocess_plate, "normalise, crop and resize one BBBC021 plate")
    p.add_argument("--table", required=True)
    p.add_argument("--plate", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--grid", type=int, nargs=2, default=[2, 2])
    p.add_argument("--normalisation", choices=["study", "percentile"], default="study")
    p.add_argument("--percentiles", type=float, nargs=2, default=[1.0, 99.9])
    p.add_argument("--illumination-dir", help="divide by the plate's illumination functions from here")
    p.add_argument("--empty-threshold", type=float, default=255 / 5.1)
    p.add_argument("--empty-fraction", type=float, default=0.002)
    p.add_argument("--controls", action="store_true", help="crop the plate's DMSO fields instead (profiling "
                   "normalises to them)")
    p.add_argument("--output-prefix", required=True)

    p = command("gather", _gather, "concatenate per-plate crops into one store per size")
    p.add_argument("--prefixes", nargs="+", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--output-dir", required=True)

    p = command("preprocess-bbbc014", _preprocess_bbbc014, "crops of the labelled BBBC014 wells")
    p.add_argument("--table", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4])
    p.add_argument("--minmax", choices=["crop", "well"], default="crop",
                   help="min-max scale each crop (the original) or the whole well")
    p.add_argument("--output-dir", required=True)

    p = command("preprocess-crops", _preprocess_crops, "resize a pre-cropped image set into the crop store")
    p.add_argument("--table", required=True, help="from `moaflow table crops`")
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--output-dir", required=True)

    p = command("folds", _folds, "write a folds file (leave one compound / cell line out, or a random field split)")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014", "crops"])
    p.add_argument("--index", help="crop or image table (parquet)")
    p.add_argument("--image-csv", help="bbbc021: build from the Broad's metadata instead of --index")
    p.add_argument("--moa-csv")
    p.add_argument("--validation-compounds", type=int, default=0)
    p.add_argument("--variant", choices=["loco", "nscb", "random_field"], default="loco",
                   help="leave one compound out, also its batches (nscb), or the lab's random split by field")
    p.add_argument("--fraction", type=float, default=0.25, help="random_field: the fields held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)

    p = command("check-folds", _check_folds, "check a folds file against the crop index, then copy it")
    p.add_argument("--folds", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True)

    from moaflow.study import PRESETS, hyperparameter_help

    p = command("train", _train, "train one architecture on one or more folds (one compilation; resumable)")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = "hyper-parameters (--hyperparameters JSON keys):\n" + hyperparameter_help()
    p.add_argument("--store", required=True, help="crops .npy at the architecture's input size")
    p.add_argument("--index", required=True)
    p.add_argument("--folds", required=True, help="the folds file")
    p.add_argument("--fold", nargs="+", required=True, help="fold name(s) to train, one after the other")
    p.add_argument("--architecture", required=True)
    p.add_argument("--weights", default="none", help="none, or a notop weights file (rule fetch_weights)")
    p.add_argument("--preset", default="final", choices=sorted(PRESETS))
    p.add_argument("--hyperparameters", type=_json, help="JSON overrides of the preset (keys below)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="")
    p.add_argument("--init", default="", help="the initialisation's name (recorded for tracking)")
    p.add_argument("--models-dir", required=True, help="each fold's outputs go to MODELS_DIR/<fold>/")
    p.add_argument("--checkpoints-dir", required=True, help="per-fold checkpoints (removed when a fold is done)")
    p.add_argument("--gpus", type=int, help="GPUs this job was given: >= 1 stops at once when none is visible, "
                   "0 hides GPUs (default: use what is visible)")
    p.add_argument("--allow-cpu", action="store_true", help="with --gpus >= 1: train on the CPU if no GPU is visible")
    p.add_argument("--load-into-memory", choices=["auto", "true", "false"], default="auto",
                   help="read the store into RAM (auto: when it needs at most half the available memory)")
    p.add_argument("--checkpoint-minutes", type=float, default=10.0,
                   help="checkpoint a fold at most this often (0: every epoch)")
    p.add_argument("--receipt", help="write the job's summary here (the workflow's output)")
    p.add_argument("--tracking-uri", help="MLflow store; $MLFLOW_TRACKING_URI wins. A server (http/https) is "
                   "logged to live, epoch by epoch")
    p.add_argument("--experiment", default="moaflow", help="MLflow experiment (live logging)")
    p.add_argument("--mlflow-parent", help="the study's parent run (results/mlflow/parent.json), for live logging")
    p.add_argument("--occlusion-examples", type=int, default=0, help="occlusion maps of this many held-out crops "
                   "per fold (the report's interpretation)")
    p.add_argument("--occlusion-grid", type=int, default=8)

    p = command("evaluate", _evaluate, "cross-validated evaluation of a dataset's trained folds, or of a "
                "predictions table (--predictions)")
    p.add_argument("dataset", help="bbbc021, bbbc014 (translocation), or a crops dataset's name (MoA)")
    p.add_argument("--predictions", help="evaluate this table (CSV/parquet; crop, image or treatment rows, "
                   "the level named by its columns) instead of trained folds")
    p.add_argument("--models-dir")
    p.add_argument("--folds")
    p.add_argument("--architectures", nargs="+")
    p.add_argument("--inits", nargs="+")
    p.add_argument("--data-receipt", help="the image table's download receipt (is the data the Broad's?)")
    p.add_argument("--published", help="the authors' predictions, shown beside the run's")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--significance", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--settings", help="JSON file of the run's resolved settings (for the deviations table)")
    p.add_argument("--out-dir", required=True)

    p = command("track", _track, "log finished training jobs to MLflow (parent + one child per job)")
    p.add_argument("--run-dirs", nargs="+", required=True)
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow/mlflow.db")
    p.add_argument("--experiment", default="moaflow")
    p.add_argument("--config-hash", default="")
    p.add_argument("--summaries", nargs="*", help="results/<dataset>/evaluation/summary.json files: their "
                   "numbers become the parent run's metrics")
    p.add_argument("--artifacts", nargs="*", help="files for the parent run (figures, summaries)")
    p.add_argument("--no-models", action="store_true", help="do not copy model files into MLflow")
    p.add_argument("--parent-file", help="the live-logging parent run to complete (results/mlflow/parent.json)")
    p.add_argument("--output", required=True)

    p = command("profile", _profile, "treatment profiles from the trained folds (and ImageNet features), "
                "NSC/NSCB 1-nearest-neighbour accuracy, literature table, profile map")
    p.add_argument("dataset")
    p.add_argument("--models-root", required=True, help="results/<dataset>/models")
    p.add_argument("--folds", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--store", type=_pairs, nargs="+", required=True, help="ARCHITECTURE=crop store .npy")
    p.add_argument("--architectures", nargs="+", required=True)
    p.add_argument("--inits", nargs="+", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--imagenet-weights", type=_pairs, nargs="*", help="ARCHITECTURE=notop weights file: adds "
                   "the 'ImageNet features, no training' source")
    p.add_argument("--statistic", choices=["mean", "median"], default="mean")
    p.add_argument("--normalisation", choices=["none", "standardize", "dmso_center", "dmso_sphere"],
                   default="none", help="dmso_*: crops normalised to their plate's DMSO crops (needs --controls, "
                   "--control-index and, with --imagenet-weights, --control-store)")
    p.add_argument("--controls", type=_pairs, nargs="*", help="ARCHITECTURE/INIT=control embeddings file "
                   "(embed-controls)")
    p.add_argument("--control-index", nargs="?", help="the DMSO crops' index.parquet")
    p.add_argument("--control-store", type=_pairs, nargs="*", help="ARCHITECTURE=DMSO crop store .npy (for "
                   "the ImageNet features)")
    p.add_argument("--sphering-regularisation", type=float, default=0.01,
                   help="dmso_sphere: added to each DMSO eigenvalue, as a fraction of their mean")
    p.add_argument("--out-dir", required=True)

    p = command("embed-controls", _embed_controls, "embed the DMSO crops with every fold's trained model "
                "(per-plate means and covariance, for profiling's DMSO normalisation)")
    p.add_argument("--models-dir", required=True, help="results/<dataset>/models/<architecture>/<init>/seed-<n>")
    p.add_argument("--folds", required=True)
    p.add_argument("--index", required=True, help="the DMSO crops' index.parquet")
    p.add_argument("--store", required=True, help="the DMSO crop store at the architecture's input size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--gpus", type=int, help="as train --gpus")
    p.add_argument("--allow-cpu", action="store_true", help="with --gpus >= 1: run on the CPU if no GPU is visible")
    p.add_argument("--output", required=True, help=".npz of per-fold DMSO statistics")

    p = command("interpret", _interpret, "figure of the occlusion maps the training jobs computed (a few "
                "held-out crops per MoA)")
    p.add_argument("--models-dir", required=True, help="results/<dataset>/models/<architecture>/<init>/seed-<n>")
    p.add_argument("--store", required=True)
    p.add_argument("--architecture", required=True)
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--channels", default=",".join(BBBC021_STORED_ORDER),
                   help="the store's three channels in order, comma-separated (default: BBBC021's stored order)")
    p.add_argument("--output", required=True)

    p = command("bench-preprocess", _bench_preprocess, "benchmark: preprocessing vs bare TIFF read+decode")
    p.add_argument("--out", default="results/bench/preprocess", help="where the full-size stand-in goes")
    p.add_argument("--repeats", type=int, default=2)

    p = command("bench-training", _bench_training, "benchmark: the feeder alone, and the train job vs a bare "
                "model.fit on the same backend and precision, with a GPU-hours estimate of the study")
    p.add_argument("--feeder", action="store_true", help="time the feeder alone (224 and 299 px, one core)")
    p.add_argument("--architectures", nargs="*", default=[], help="train-job benchmark for these (needs a GPU to mean much)")
    p.add_argument("--out", default="results/bench/training", help="synthetic study-shaped stores go here")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision", default="mixed_bfloat16", choices=["float32", "mixed_float16", "mixed_bfloat16"])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--folds-per-job", type=int, default=10, help="for the estimate")

    p = command("demo", _demo, "serve a generated stand-in on 127.0.0.1 and run the pipeline on it")
    p.add_argument("--configfile", default="config/demo.yaml", help="run from the repository root")
    p.add_argument("--snakefile", default="Snakefile")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="passed on to snakemake")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # TensorFlow's C++ start-up lines (CUDA probing on CPU-only machines) look like failures; Python
    # errors and our own messages still show.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from threadpoolctl import threadpool_limits

    import cv2

    # A job gets the cores its rule declares: BLAS and OpenCV must not start one thread per machine
    # core in each of several parallel jobs (that halves throughput).
    cv2.setNumThreads(args.threads)
    try:
        with threadpool_limits(limits=args.threads):
            status = args.func(args)
    except USER_ERRORS as exc:
        print(f"moaflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
