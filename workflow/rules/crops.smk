# Pre-cropped image sets described by a metadata table (config `crops:`, e.g. the BBBC021 lab subset):
# table -> crop store resized to each architecture's input size -> folds. Training, evaluation, MLflow and
# the report are the same rules as for BBBC021. One rule per dataset: their input sizes differ.

for _name, _crops in CROPS.items():
    if _crops.get("download"):

        # A downloaded set (crops.<name>.download): its metadata table and image archives fetched on the
        # submit host like BBBC021's, each archive extracted to a folder of its own, verified, receipted.
        rule:
            name:
                f"download_{_name}"
            output:
                destination=receipt(layout.raw(_name, "{filename}")),
            log:
                layout.log("download", f"{_name}_{{filename}}"),
            benchmark:
                layout.benchmark(f"download_{_name}", f"{_name}_{{filename}}")
            wildcard_constraints:
                filename="|".join(
                    map(
                        re.escape,
                        [
                            _crops["download"]["metadata"],
                            *_crops["download"]["archives"],
                        ],
                    )
                ),
            localrule: True
            conda:
                "../../envs/moaflow.yaml"
            threads: 1
            resources:
                downloads=1,
                mem_mb=256,
                runtime=240,
            params:
                step="fetch",
                section=("crops", _name, "download"),
                filename="{filename}",
                published=lambda wc, spec=_crops: spec["download"]
                .get("published_files", {})
                .get(wc.filename),
                kind=lambda wc: "zip" if wc.filename.endswith(".zip") else "text",
            script:
                "../scripts/fetch.py"

        rule:
            name:
                f"extract_{_name}"
            input:
                archive=receipt(layout.raw(_name, "{folder}.zip")),
            output:
                target=receipt(os.path.join(_crops["images"], "{folder}")),
            log:
                layout.log("extract", f"{_name}_{{folder}}"),
            benchmark:
                layout.benchmark(f"extract_{_name}", f"{_name}_{{folder}}")
            wildcard_constraints:
                folder="|".join(map(re.escape, moaflow_config.archive_folders(_crops))),
            conda:
                "../../envs/moaflow.yaml"
            threads: 1
            resources:
                mem_mb=1024,
                runtime=60,
            params:
                step="extract-crops",
                member_root="{folder}",
            script:
                "../scripts/extract.py"

    rule:
        name:
            f"crops_table_{_name}"
        input:
            (
                download_targets(_name)
                if _crops.get("download")
                else [_crops["metadata"], _crops["images"]]
            ),
        output:
            output=layout.image_table(_name),
        log:
            layout.log("image_table", _name),
        benchmark:
            layout.benchmark(f"crops_table_{_name}", _name)
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=10,
        params:
            step="table-crops",
            # Only what decides the table's content: renaming the channels of one file per crop redoes nothing
            # (one file per channel follows `channels`' order). A function: Snakemake would take the file
            # name pattern's braces for wildcards.
            settings=lambda wc, spec=_crops: crops_table_settings(spec),
        script:
            STEP

    rule:
        name:
            f"preprocess_{_name}"
        input:
            table=layout.image_table(_name),
        output:
            [layout.store(_name, s) for s in config["preprocess"][_name]["input_sizes"]],
            (
                [
                    layout.store(_name, s, "dmso")
                    for s in config["preprocess"][_name]["input_sizes"]
                ]
                + [layout.store_index(_name, "dmso")]
                if _crops.get("control_compound")
                else []
            ),
            layout.store_index(_name),
        log:
            layout.log("preprocess", _name),
        benchmark:
            layout.benchmark(f"preprocess_{_name}", _name)
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=3000,
            runtime=30,
        params:
            step="preprocess-crops",
            output_dir=os.path.dirname(layout.store_index(_name)),
            sizes=config["preprocess"][_name]["input_sizes"],
            channels=len(_crops["channels"]),
            control_compound=_crops.get("control_compound"),
            normalisation=_crops["normalisation"],
            percentiles=_crops["percentiles"],
            grid=_crops["crop_grid"],
            controls_dir=os.path.dirname(layout.store_index(_name, "dmso")),
        script:
            STEP

    rule:
        name:
            f"folds_{_name}"
        input:
            index=layout.store_index(_name),
        output:
            output=layout.generated_folds(_name),
        log:
            layout.log("training", f"{_name}_folds"),
        benchmark:
            layout.benchmark(f"folds_{_name}", f"{_name}_folds")
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=5,
        params:
            **TRAIN[_name]["folds"],
            step="folds",
            dataset="crops",
        script:
            STEP
