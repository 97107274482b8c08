"""``moaflow`` command line: one sub-command per workflow step, plus the demo.

Each Snakemake rule calls one sub-command, so every step can also be run (and
debugged) by hand. Errors end with exit status 1 and one line naming the
file, key or value at fault.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from moaflow import download, illumination, image_table, preprocess, standin

def _shape(text: str) -> tuple[int, int]:
    try:
        rows, columns = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWSxCOLUMNS, e.g. 1024x1280") from None
    return rows, columns


def _cmd_standin(args) -> None:
    if args.dataset == "bbbc021":
        standin.write_bbbc021(
            args.out, n_plates=args.plates, sites=args.sites, dmso_wells=args.dmso_wells, moas=args.moas,
            compounds_per_moa=args.compounds_per_moa,
            concentrations_per_compound=args.concentrations_per_compound,
            shape=args.shape or (1024, 1280), seed=args.seed)
    else:
        standin.write_bbbc014(args.out, shape=args.shape or (1024, 1360), dapi_channel=args.dapi_channel,
                              seed=args.seed)


def _cmd_serve(args) -> None:
    from moaflow.serve import StandinServer

    server = StandinServer(args.root, args.port, ignore_range=args.ignore_range, rate=args.rate)
    print(f"serving {args.root} at {server.url} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _cmd_fetch(args) -> None:
    verify = download.verify_zip if args.kind == "zip" else None
    download.fetch(args.url, args.output, retries=args.retries, backoff_seconds=args.backoff,
                   timeout_seconds=args.timeout, verify=verify)


def _check_bmp(path: Path) -> None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except Exception as exc:  # PIL raises several types for damaged files
        raise download.VerificationError(f"{path}: not a readable BMP ({exc})") from exc


def _cmd_extract_bbbc021(args) -> None:
    expected = image_table.plate_file_names(args.image_csv, args.plate)
    download.extract_archive(args.archive, args.output, member_root=args.plate, expected=expected,
                             check_file=illumination.read_tiff)


def _cmd_extract_bbbc014(args) -> None:
    target = download.extract_archive(args.archive, args.output, member_root=args.member_root,
                                      check_file=_check_bmp)
    found = sum(1 for _ in target.iterdir())
    if found != args.expected_images:
        import shutil

        shutil.rmtree(target)
        raise download.VerificationError(
            f"{args.archive}: {found} images under {args.member_root}/, expected {args.expected_images} "
            "(bbbc014.expected_images)")


def _cmd_table(args) -> None:
    if args.dataset == "bbbc021":
        table = image_table.bbbc021_image_table(args.image_csv, args.moa_csv, args.image_root,
                                                plates=args.plates, taxol_rule=not args.no_taxol_rule)
        annotated = table[~table["is_dmso"]]
        print(f"{len(annotated)} annotated fields, {annotated['compound'].nunique()} compounds, "
              f"{annotated['treatment'].nunique()} treatments, {annotated['moa'].nunique()} MoAs, "
              f"{int(table['is_dmso'].sum())} DMSO fields", file=sys.stderr)
    else:
        settings = json.loads(args.settings)
        table = image_table.bbbc014_image_table(
            args.image_root, filename_regex=settings["filename_regex"], dapi_channel=settings["dapi_channel"],
            cell_lines=settings["cell_lines"], positive_columns=settings["positive_columns"],
            negative_columns=settings["negative_columns"])
        print(f"{len(table)} wells, {int((table['label'] >= 0).sum())} labelled", file=sys.stderr)
    image_table.write_table(table, args.output)


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cmd_illumination(args) -> None:
    import pandas as pd

    frame = pd.read_csv(args.image_csv)
    rows = frame[frame["Image_Metadata_Plate_DAPI"] == args.plate]
    if rows.empty:
        raise image_table.MetadataError(f"{args.image_csv}: no fields for plate {args.plate!r}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    functions = {}
    for channel in preprocess.READ_ORDER:  # CellProfiler's "All" mode: every field of the plate
        paths = [Path(args.image_root) / args.plate / name for name in rows[f"Image_FileName_{channel}"]]
        average = illumination.mean_image(paths, log=_log, label=f"{args.plate} {channel}")
        functions[channel] = illumination.illumination_function(
            average, args.filter_size, args.downscale, args.robust_percentile)
    for channel, function in functions.items():
        preprocess.write_array(function, out / f"{args.plate}_{channel}.npy")
    illumination.plot_functions(functions, out / f"{args.plate}.png", f"Illumination functions, {args.plate}")


def _cmd_preprocess_plate(args) -> None:
    import numpy as np
    import pandas as pd

    table = pd.read_parquet(args.table)
    fields = table[table["plate"] == args.plate]
    if fields.empty:
        raise image_table.MetadataError(f"{args.table}: no fields for plate {args.plate!r}")
    functions = None
    if args.illumination_dir:
        functions = np.stack([np.load(Path(args.illumination_dir) / f"{args.plate}_{c}.npy")
                              for c in preprocess.READ_ORDER])
    arrays, index = preprocess.preprocess_plate(
        fields, sizes=args.sizes, grid=tuple(args.grid), normalisation=args.normalisation,
        percentiles=tuple(args.percentiles), illumination=functions, empty_threshold=args.empty_threshold,
        empty_fraction=args.empty_fraction, log=_log)
    prefix = Path(args.output_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    for size, array in arrays.items():
        preprocess.write_array(array, f"{prefix}.{size}.npy")
    image_table.write_table(index, f"{prefix}.index.parquet")


def _cmd_gather(args) -> None:
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = None
    for size in args.sizes:
        parts = [(f"{p}.{size}.npy", f"{p}.index.parquet") for p in args.prefixes]
        index = preprocess.gather(parts, out / f"{size}.npy")
    image_table.write_table(index, out / "index.parquet")
    _log(f"{len(index)} crops from {len(args.prefixes)} plate(s) at sizes {args.sizes}")


def _cmd_preprocess_bbbc014(args) -> None:
    import pandas as pd

    arrays, index = preprocess.preprocess_bbbc014(pd.read_parquet(args.table), sizes=args.sizes,
                                                  grid=tuple(args.grid), log=_log)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for size, array in arrays.items():
        preprocess.write_array(array, out / f"{size}.npy")
    index.insert(0, "crop_id", range(len(index)))
    image_table.write_table(index, out / "index.parquet")


def _cmd_folds(args) -> None:
    from moaflow import folds

    if args.dataset == "bbbc021":
        if args.image_csv:  # straight from the Broad's metadata, before anything is downloaded
            index = image_table.bbbc021_image_table(args.image_csv, args.moa_csv, "images")
        else:
            import pandas as pd

            index = pd.read_parquet(args.index)
        table = folds.leave_one_compound_out(index[index["moa"] != "DMSO"], n_validation=args.validation_compounds,
                                             seed=args.seed, variant=args.variant)
    else:
        import pandas as pd

        table = folds.leave_one_cell_line_out(pd.read_parquet(args.index))
    folds.write_folds(table, args.output)
    _log(f"{len(table)} folds written to {args.output}")


def _cmd_check_folds(args) -> None:
    import shutil

    import pandas as pd

    from moaflow import folds

    table = folds.read_folds(args.folds)
    folds.check_folds(table, pd.read_parquet(args.index))
    shutil.copyfile(args.folds, args.output)


def _cmd_train(args) -> None:
    from moaflow import train

    hyper = train.hyperparameters(args.preset, args.architecture, json.loads(args.hyperparameters or "{}"))
    train.train_fold(args.store, args.index, args.folds, args.fold, architecture=args.architecture,
                     weights=args.weights, hyper=hyper, seed=args.seed, out_dir=args.out_dir,
                     checkpoint_dir=args.checkpoint_dir, dataset=args.dataset, init=args.init, log=_log)


def _cmd_train_folder(args) -> None:
    from moaflow import train

    hyper = train.hyperparameters(args.preset, args.architecture, json.loads(args.hyperparameters or "{}"))
    train.train_folder(args.root, architecture=args.architecture, input_size=args.input_size, hyper=hyper,
                       weights=args.weights, validation_fraction=args.validation_fraction, seed=args.seed,
                       out_dir=args.out_dir, log=_log)


def _cmd_evaluate(args) -> None:
    from moaflow import evaluate, folds

    table = folds.read_folds(args.folds)
    if args.dataset == "bbbc021":
        evaluate.evaluate_bbbc021(args.models_dir, table, args.architectures, args.inits, args.out_dir,
                                  args.significance, seeds=args.seeds)
        config = json.loads(Path(args.config_json).read_text()) if args.config_json else {}
        evaluate.deviations(config).to_csv(Path(args.out_dir) / "deviations.csv", index=False)
    else:
        evaluate.evaluate_bbbc014(args.models_dir, table, args.architectures, args.inits, args.out_dir,
                                  seeds=args.seeds)
    _log(f"evaluation written to {args.out_dir}")


def _cmd_track(args) -> None:
    from moaflow import tracking

    runs = tracking.log_study(
        args.run_dirs, tracking_uri=args.tracking_uri, experiment=args.experiment,
        tags={"git_commit": tracking.git_commit(), "config_hash": args.config_hash},
        parent_params=json.loads(Path(args.params).read_text()) if args.params else None,
        parent_metrics=tracking.flatten_metrics({Path(p).parent.parent.name: json.loads(Path(p).read_text())
                                                 for p in args.summaries or []}),
        parent_artifacts=args.artifacts or [], log_models=not args.no_models, log=_log)
    tmp = Path(args.output + ".tmp")
    tmp.write_text(json.dumps(runs, indent=1))
    os.replace(tmp, args.output)


def _cmd_demo(args) -> int:
    import yaml

    from moaflow.serve import StandinServer

    started = time.monotonic()
    config_path = Path(args.configfile)
    settings = yaml.safe_load(config_path.read_text()).get("standin")
    if not settings:
        raise ValueError(f"{config_path}: no 'standin' section; the demo needs one to build its data")
    out = Path(settings["out_dir"])
    wanted = {"bbbc021": settings["bbbc021"], "bbbc014": settings["bbbc014"], "version": standin.GENERATOR_VERSION}
    stamp = out / "settings.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != wanted:
        print(f"building the stand-in data in {out} ...", flush=True)
        b021, b014 = dict(settings["bbbc021"]), dict(settings["bbbc014"])
        standin.write_bbbc021(out, shape=tuple(b021.pop("shape")), **b021)
        standin.write_bbbc014(out, shape=tuple(b014.pop("shape")), **b014)
        stamp.write_text(json.dumps(wanted))
    env = dict(os.environ)
    # Rules call `moaflow`: make the interpreter's own bin folder win on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    command = [str(Path(sys.executable).parent / "snakemake"), "--snakefile", args.snakefile, "--rerun-incomplete",
               "--configfile", str(config_path),
               "--cores", str(args.cores), *args.snakemake_args]
    try:
        server = StandinServer(out / "www", settings["port"])
    except OSError as exc:
        raise ValueError(f"{config_path}: cannot serve the stand-in on 127.0.0.1:{settings['port']} ({exc}); "
                         "set standin.port and the base_urls to a free port") from exc
    with server:
        print(f"stand-in served at {server.url}; running: {' '.join(command)}", flush=True)
        result = subprocess.run(command, env=env)
    if result.returncode != 0:
        return result.returncode
    report = Path("results") / "report.html"
    command = [str(Path(sys.executable).parent / "snakemake"), "--snakefile", args.snakefile,
               "--configfile", str(config_path), "--report", str(report)]
    result = subprocess.run(command, env=env)
    if result.returncode == 0:
        print(f"demo finished in {time.monotonic() - started:.0f} s; report: {report.resolve()}", flush=True)
    return result.returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moaflow", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="cores this command may use (BLAS threads); rules pass their `threads`")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("standin", help="write a BBBC021- or BBBC014-shaped stand-in dataset")
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
    p.set_defaults(func=_cmd_standin)

    p = sub.add_parser("serve", help="serve a folder over HTTP on 127.0.0.1 (with Range support)")
    p.add_argument("root")
    p.add_argument("--port", type=int, default=8021)
    p.add_argument("--ignore-range", action="store_true", help="behave like a server without Range support")
    p.add_argument("--rate", type=int, help="throttle to about this many bytes/s per response")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("fetch", help="download one file, resumable, from mirrors in order")
    p.add_argument("--url", action="append", required=True, help="repeat for each mirror, in order")
    p.add_argument("--output", required=True)
    p.add_argument("--kind", choices=["zip", "file"], default="file", help="zip: verify every member's CRC")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--backoff", type=float, default=2.0, help="seconds before the first retry (doubles)")
    p.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("extract-bbbc021", help="extract and check one BBBC021 plate archive")
    p.add_argument("--archive", required=True)
    p.add_argument("--image-csv", required=True)
    p.add_argument("--plate", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_extract_bbbc021)

    p = sub.add_parser("extract-bbbc014", help="extract and check the BBBC014 image archive")
    p.add_argument("--archive", required=True)
    p.add_argument("--member-root", required=True)
    p.add_argument("--expected-images", type=int, required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_extract_bbbc014)

    p = sub.add_parser("table", help="build the per-field image table of a dataset")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014"])
    p.add_argument("--image-root", required=True, help="folder of extracted images")
    p.add_argument("--image-csv")
    p.add_argument("--moa-csv")
    p.add_argument("--plates", nargs="+")
    p.add_argument("--no-taxol-rule", action="store_true")
    p.add_argument("--settings", help="bbbc014: the config's bbbc014 section as JSON")
    p.add_argument("--output", required=True, help=".parquet or .csv")
    p.set_defaults(func=_cmd_table)

    p = sub.add_parser("illumination", help="illumination functions of one BBBC021 plate (all its fields)")
    p.add_argument("--image-csv", required=True)
    p.add_argument("--image-root", required=True)
    p.add_argument("--plate", required=True)
    p.add_argument("--filter-size", type=float, required=True)
    p.add_argument("--downscale", type=int, default=1)
    p.add_argument("--robust-percentile", type=float, default=2.0)
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=_cmd_illumination)

    p = sub.add_parser("preprocess-plate", help="normalise, crop and resize one BBBC021 plate")
    p.add_argument("--table", required=True)
    p.add_argument("--plate", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--grid", type=int, nargs=2, default=[2, 2])
    p.add_argument("--normalisation", choices=["study", "percentile"], default="study")
    p.add_argument("--percentiles", type=float, nargs=2, default=[1.0, 99.9])
    p.add_argument("--illumination-dir", help="divide by the plate's illumination functions from here")
    p.add_argument("--empty-threshold", type=float, default=255 / 5.1)
    p.add_argument("--empty-fraction", type=float, default=0.002)
    p.add_argument("--output-prefix", required=True)
    p.set_defaults(func=_cmd_preprocess_plate)

    p = sub.add_parser("gather", help="concatenate per-plate crops into one store per size")
    p.add_argument("--prefixes", nargs="+", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=_cmd_gather)

    p = sub.add_parser("preprocess-bbbc014", help="crops of the labelled BBBC014 wells")
    p.add_argument("--table", required=True)
    p.add_argument("--sizes", type=int, nargs="+", required=True)
    p.add_argument("--grid", type=int, nargs=2, default=[4, 4])
    p.add_argument("--output-dir", required=True)
    p.set_defaults(func=_cmd_preprocess_bbbc014)

    p = sub.add_parser("folds", help="write a folds file (leave one compound / cell line out)")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014"])
    p.add_argument("--index", help="crop or image table (parquet)")
    p.add_argument("--image-csv", help="bbbc021: build from the Broad's metadata instead of --index")
    p.add_argument("--moa-csv")
    p.add_argument("--validation-compounds", type=int, default=0)
    p.add_argument("--variant", choices=["nsc", "nscb"], default="nsc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_folds)

    p = sub.add_parser("check-folds", help="check a folds file against the crop index, then copy it")
    p.add_argument("--folds", required=True)
    p.add_argument("--index", required=True)
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_check_folds)

    p = sub.add_parser("train", help="train one architecture on one fold (resumes from its checkpoint)")
    p.add_argument("--store", required=True, help="crops .npy at the architecture's input size")
    p.add_argument("--index", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--fold", required=True)
    p.add_argument("--architecture", required=True)
    p.add_argument("--weights", default="none", help="imagenet, none, or a weights file")
    p.add_argument("--preset", default="final")
    p.add_argument("--hyperparameters", help="JSON overrides of the preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", default="")
    p.add_argument("--init", default="", help="the initialisation's name (recorded for tracking)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--checkpoint-dir", required=True)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("train-folder", help="train on a class-per-folder image set (root/<class>/<image>)")
    p.add_argument("--root", required=True)
    p.add_argument("--architecture", default="lab_cnn")
    p.add_argument("--input-size", type=int, default=256)
    p.add_argument("--weights", default="none")
    p.add_argument("--preset", default="lab")
    p.add_argument("--hyperparameters", help="JSON overrides of the preset")
    p.add_argument("--validation-fraction", type=float, default=0.25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_train_folder)

    p = sub.add_parser("evaluate", help="cross-validated evaluation of a dataset's trained folds")
    p.add_argument("dataset", choices=["bbbc021", "bbbc014"])
    p.add_argument("--models-dir", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--architectures", nargs="+", required=True)
    p.add_argument("--inits", nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--significance", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--config-json", help="the run's config (for the deviations table)")
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("track", help="log finished training jobs to MLflow (parent + one child per job)")
    p.add_argument("--run-dirs", nargs="+", required=True)
    p.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI, else sqlite:///results/mlflow/mlflow.db")
    p.add_argument("--experiment", default="moaflow")
    p.add_argument("--config-hash", default="")
    p.add_argument("--params", help="JSON file of parameters for the parent run")
    p.add_argument("--summaries", nargs="*", help="results/<dataset>/evaluation/summary.json files: their "
                   "numbers become the parent run's metrics")
    p.add_argument("--artifacts", nargs="*", help="files for the parent run (figures, summaries)")
    p.add_argument("--no-models", action="store_true", help="do not copy model files into MLflow")
    p.add_argument("--output", required=True)
    p.set_defaults(func=_cmd_track)

    p = sub.add_parser("bench-preprocess", help="benchmark: preprocessing vs bare TIFF read+decode")
    p.add_argument("--out", default="results/bench/preprocess", help="where the full-size stand-in goes")
    p.add_argument("--repeats", type=int, default=2)
    p.set_defaults(func=lambda a: __import__("moaflow.bench", fromlist=["bench"]).bench_preprocess(a.out, a.repeats)
                   and None)

    p = sub.add_parser("bench-training", help="benchmark: training images/s from the store vs in-memory data")
    p.add_argument("--store-dir", default="results/bbbc021/crops")
    p.add_argument("--sizes", default='{"resnet50": 224, "inception_v3": 299, "inception_resnet_v2": 299}',
                   help="JSON architecture -> input size (an existing <size>.npy in --store-dir)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4)
    p.set_defaults(func=lambda a: __import__("moaflow.bench", fromlist=["bench"]).bench_training(
        a.store_dir, json.loads(a.sizes), steps=a.steps, batch_size=a.batch_size, workers=a.workers) and None)

    p = sub.add_parser("demo", help="serve a generated stand-in on 127.0.0.1 and run the pipeline on it")
    p.add_argument("--configfile", default="config/demo.yaml", help="run from the repository root")
    p.add_argument("--snakefile", default="Snakefile")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("snakemake_args", nargs=argparse.REMAINDER, help="passed on to snakemake")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from threadpoolctl import threadpool_limits

    args = build_parser().parse_args(argv)
    # A job gets the cores its rule declares: BLAS must not start one thread per
    # machine core in each of several parallel jobs (that halves throughput).
    try:
        with threadpool_limits(limits=args.threads):
            status = args.func(args)
    except (download.DownloadError, download.VerificationError, image_table.MetadataError,
            ValueError, FileNotFoundError) as exc:
        print(f"moaflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
