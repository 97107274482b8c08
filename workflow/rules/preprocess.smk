# Per-plate illumination functions, then per-plate normalise + crop + resize, then one gather job per
# dataset into memory-mappable uint8 stores (layout.store).

PRE021 = config["preprocess"]["bbbc021"]
PRE014 = config["preprocess"]["bbbc014"]
ILLUMINATION = PRE021["illumination"]


rule illumination_bbbc021:
    input:
        table=layout.image_table("bbbc021"),
    output:
        functions=illumination_functions("{plate}"),
        figure=report(
            layout.illumination_figure("{plate}"),
            caption="../report/illumination.rst",
            category="QC",
            subcategory="Illumination functions",
            labels={"plate": "{plate}"},
        ),
    log:
        layout.log("illumination", "{plate}"),
    benchmark:
        layout.benchmark("illumination_bbbc021", "{plate}")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=60,
    params:
        step="illumination",
        plate="{plate}",
        filter_size=ILLUMINATION["filter_size"],
        downscale=ILLUMINATION["downscale"],
        robust_percentile=ILLUMINATION["robust_percentile"],
    script:
        STEP


# The treatment crops train and evaluate; the DMSO crops (the same plates' negative controls, normalised
# the same way) are made only when profiling normalises to them (a feature normalisation that needs them).
for _kind, _suffix in (("crops", ""), ("dmso", "_dmso")):

    rule:
        name:
            f"preprocess_bbbc021{_suffix}_plate"
        input:
            receipt(layout.plate_images("{plate}")),
            table=layout.image_table("bbbc021"),
            illumination=branch(
                ILLUMINATION["apply"],
                then=illumination_functions("{plate}"),
                otherwise=[],
            ),
        output:
            [
                layout.plate_part("{plate}", _kind) + f".{s}.npy"
                for s in PRE021["input_sizes"]
            ],
            layout.plate_part("{plate}", _kind) + ".index.parquet",
        log:
            layout.log(f"preprocess{_suffix}", "{plate}"),
        benchmark:
            layout.benchmark(f"preprocess_bbbc021{_suffix}_plate", "{plate}")
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=3000,
            runtime=60,
        params:
            step="preprocess-plate",
            plate="{plate}",
            output_prefix=layout.plate_part("{plate}", _kind),
            controls=_kind == "dmso",
            sizes=PRE021["input_sizes"],
            grid=PRE021["crop_grid"],
            normalisation=PRE021["normalisation"],
            percentiles=PRE021["percentiles"],
            empty_threshold=PRE021["empty_threshold"],
            empty_fraction=PRE021["empty_fraction"],
        script:
            STEP

    rule:
        name:
            f"gather_bbbc021{_suffix}"
        input:
            [
                layout.plate_part(p, _kind) + suffix
                for p in BBBC021_PLATES
                for suffix in [".index.parquet"]
                + [f".{s}.npy" for s in PRE021["input_sizes"]]
            ],
        output:
            [layout.store("bbbc021", s, _kind) for s in PRE021["input_sizes"]],
            layout.store_index("bbbc021", _kind),
        log:
            layout.log("preprocess", f"gather_bbbc021{_suffix}"),
        benchmark:
            layout.benchmark(f"gather_bbbc021{_suffix}", f"gather_bbbc021{_suffix}")
        conda:
            "../../envs/moaflow.yaml"
        threads: 1
        resources:
            mem_mb=1000,
            runtime=60,
        params:
            step="gather",
            prefixes=[layout.plate_part(p, _kind) for p in BBBC021_PLATES],
            sizes=PRE021["input_sizes"],
            output_dir=lambda wc, output: os.path.dirname(output[-1]),
        script:
            STEP


rule preprocess_bbbc014:
    input:
        receipt(layout.images_dir("bbbc014")),
        table=layout.image_table("bbbc014"),
    output:
        [layout.store("bbbc014", s) for s in PRE014["input_sizes"]],
        layout.store_index("bbbc014"),
    log:
        layout.log("preprocess", "bbbc014"),
    benchmark:
        layout.benchmark("preprocess_bbbc014", "bbbc014")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        step="preprocess-bbbc014",
        output_dir=lambda wc, output: os.path.dirname(output[-1]),
        sizes=PRE014["input_sizes"],
        grid=PRE014["crop_grid"],
        minmax=PRE014["minmax"],
    script:
        STEP
