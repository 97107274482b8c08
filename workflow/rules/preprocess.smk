# Per-plate illumination functions, then per-plate normalise + crop + resize,
# then one gather job per dataset into memory-mappable uint8 stores.

PRE021 = config["preprocess"]["bbbc021"]
PRE014 = config["preprocess"]["bbbc014"]
ILLUMINATION = PRE021["illumination"]


rule illumination_bbbc021:
    input:
        plate=verified("results/bbbc021/images/{plate}"),
        image_csv=verified(BBBC021_IMAGE_CSV),
    output:
        functions=expand(
            "results/bbbc021/illumination/{{plate}}_{channel}.npy",
            channel=BBBC021_CHANNELS,
        ),
        figure=report(
            "results/bbbc021/illumination/{plate}.png",
            caption="../report/illumination.rst",
            category="QC",
            subcategory="Illumination functions",
            labels={"plate": "{plate}"},
        ),
    params:
        image_csv=lambda wc, input: data_of(input.image_csv),
        filter_size=ILLUMINATION["filter_size"],
        downscale=ILLUMINATION["downscale"],
        robust_percentile=ILLUMINATION["robust_percentile"],
    log:
        "results/logs/illumination/{plate}.log",
    resources:
        mem_mb=1500,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow --threads {threads} illumination --image-csv {params.image_csv:q}"
        " --image-root results/bbbc021/images --plate {wildcards.plate:q}"
        " --filter-size {params.filter_size:q} --downscale {params.downscale:q}"
        " --robust-percentile {params.robust_percentile:q}"
        " --output-dir results/bbbc021/illumination 2> {log:q}"


# The treatment crops train and evaluate; the DMSO crops (the same plates' negative controls, normalised
# the same way) are made only when profiling normalises to them (profiling.normalisation dmso_*).
for _kind, _suffix, _flag in (("crops", "", ""), ("dmso", "_dmso", "--controls")):

    rule:
        name:
            f"preprocess_bbbc021{_suffix}_plate"
        input:
            table="results/bbbc021/images.parquet",
            plate=verified("results/bbbc021/images/{plate}"),
            functions=branch(
                ILLUMINATION["apply"],
                then=expand(
                    "results/bbbc021/illumination/{{plate}}_{channel}.npy",
                    channel=BBBC021_CHANNELS,
                ),
                otherwise=[],
            ),
        output:
            arrays=expand(
                f"results/bbbc021/{_kind}/plates/{{{{plate}}}}.{{size}}.npy",
                size=PRE021["input_sizes"],
            ),
            index=f"results/bbbc021/{_kind}/plates/{{plate}}.index.parquet",
        params:
            sizes=PRE021["input_sizes"],
            grid=PRE021["crop_grid"],
            normalisation=PRE021["normalisation"],
            percentiles=PRE021["percentiles"],
            empty_threshold=PRE021["empty_threshold"],
            empty_fraction=PRE021["empty_fraction"],
            illumination=(
                "--illumination-dir results/bbbc021/illumination"
                if ILLUMINATION["apply"]
                else ""
            ),
            controls=_flag,
            prefix=lambda wc, output: output.index[: -len(".index.parquet")],
        log:
            f"results/logs/preprocess{_suffix}/{{plate}}.log",
        resources:
            mem_mb=3000,
            runtime=60,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow --threads {threads} preprocess-plate --table {input.table:q} --plate {wildcards.plate:q}"
            " --sizes {params.sizes:q} --grid {params.grid:q} --normalisation {params.normalisation:q}"
            " --percentiles {params.percentiles:q} --empty-threshold {params.empty_threshold:q}"
            " --empty-fraction {params.empty_fraction:q} {params.illumination} {params.controls}"
            " --output-prefix {params.prefix:q} 2> {log:q}"

    rule:
        name:
            f"gather_bbbc021{_suffix}"
        input:
            expand(
                f"results/bbbc021/{_kind}/plates/{{plate}}.index.parquet",
                plate=BBBC021_PLATES,
            ),
            expand(
                f"results/bbbc021/{_kind}/plates/{{plate}}.{{size}}.npy",
                plate=BBBC021_PLATES,
                size=PRE021["input_sizes"],
            ),
        output:
            arrays=expand(
                f"results/bbbc021/{_kind}/{{size}}.npy", size=PRE021["input_sizes"]
            ),
            index=f"results/bbbc021/{_kind}/index.parquet",
        params:
            prefixes=[f"results/bbbc021/{_kind}/plates/{p}" for p in BBBC021_PLATES],
            sizes=PRE021["input_sizes"],
            out_dir=lambda wc, output: os.path.dirname(output.index),
        log:
            f"results/logs/preprocess/gather_bbbc021{_suffix}.log",
        resources:
            mem_mb=1000,
            runtime=60,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow gather --prefixes {params.prefixes:q} --sizes {params.sizes:q}"
            " --output-dir {params.out_dir:q} 2> {log:q}"


rule preprocess_bbbc014:
    input:
        table="results/bbbc014/images.parquet",
        images=verified("results/bbbc014/images"),
    output:
        arrays=expand("results/bbbc014/crops/{size}.npy", size=PRE014["input_sizes"]),
        index="results/bbbc014/crops/index.parquet",
    params:
        sizes=PRE014["input_sizes"],
        grid=PRE014["crop_grid"],
        minmax=PRE014["minmax"],
    log:
        "results/logs/preprocess/bbbc014.log",
    resources:
        mem_mb=3000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow --threads {threads} preprocess-bbbc014 --table {input.table:q} --sizes {params.sizes:q}"
        " --grid {params.grid:q} --minmax {params.minmax:q} --output-dir results/bbbc014/crops 2> {log:q}"
