# Per-plate illumination functions, then per-plate normalise + crop + resize,
# then one gather job per dataset into memory-mappable uint8 stores.

PRE021 = config["preprocess"]["bbbc021"]
PRE014 = config["preprocess"]["bbbc014"]
ILLUMINATION = PRE021["illumination"]
CHANNELS = ["DAPI", "Tubulin", "Actin"]


rule illumination_bbbc021:
    input:
        plate="results/bbbc021/images/{plate}",
        image_csv=f"results/bbbc021/raw/{config['bbbc021']['image_csv']}",
    output:
        functions=expand(
            "results/bbbc021/illumination/{{plate}}_{channel}.npy", channel=CHANNELS
        ),
        figure=report(
            "results/bbbc021/illumination/{plate}.png",
            caption="../report/illumination.rst",
            category="QC",
            subcategory="Illumination functions",
            labels={"plate": "{plate}"},
        ),
    params:
        options=(
            f"--filter-size {ILLUMINATION['filter_size']} --downscale {ILLUMINATION['downscale']}"
            f" --robust-percentile {ILLUMINATION['robust_percentile']}"
        ),
    log:
        "results/logs/illumination/{plate}.log",
    resources:
        mem_mb=1500,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow --threads {threads} illumination --image-csv {input.image_csv} --image-root results/bbbc021/images"
        " --plate {wildcards.plate} {params.options}"
        " --output-dir results/bbbc021/illumination 2> {log}"


rule preprocess_bbbc021_plate:
    input:
        table="results/bbbc021/images.parquet",
        plate="results/bbbc021/images/{plate}",
        functions=branch(
            ILLUMINATION["apply"],
            then=expand(
                "results/bbbc021/illumination/{{plate}}_{channel}.npy", channel=CHANNELS
            ),
            otherwise=[],
        ),
    output:
        arrays=expand(
            "results/bbbc021/crops/plates/{{plate}}.{size}.npy",
            size=PRE021["input_sizes"],
        ),
        index="results/bbbc021/crops/plates/{plate}.index.parquet",
    params:
        options=" ".join(
            [
                f"--sizes {' '.join(map(str, PRE021['input_sizes']))}",
                f"--grid {PRE021['crop_grid'][0]} {PRE021['crop_grid'][1]}",
                f"--normalisation {PRE021['normalisation']}",
                f"--percentiles {PRE021['percentiles'][0]} {PRE021['percentiles'][1]}",
                f"--empty-threshold {PRE021['empty_threshold']}",
                f"--empty-fraction {PRE021['empty_fraction']}",
                (
                    "--illumination-dir results/bbbc021/illumination"
                    if ILLUMINATION["apply"]
                    else ""
                ),
            ]
        ),
    log:
        "results/logs/preprocess/{plate}.log",
    resources:
        mem_mb=3000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow --threads {threads} preprocess-plate --table {input.table} --plate {wildcards.plate} {params.options}"
        " --output-prefix results/bbbc021/crops/plates/{wildcards.plate} 2> {log}"


rule gather_bbbc021:
    input:
        expand(
            "results/bbbc021/crops/plates/{plate}.index.parquet", plate=BBBC021_PLATES
        ),
        expand(
            "results/bbbc021/crops/plates/{plate}.{size}.npy",
            plate=BBBC021_PLATES,
            size=PRE021["input_sizes"],
        ),
    output:
        arrays=expand(
            "results/bbbc021/crops/{size}.npy", size=PRE021["input_sizes"]
        ),
        index="results/bbbc021/crops/index.parquet",
    params:
        prefixes=" ".join(f"results/bbbc021/crops/plates/{p}" for p in BBBC021_PLATES),
        sizes=" ".join(map(str, PRE021["input_sizes"])),
    log:
        "results/logs/preprocess/gather_bbbc021.log",
    resources:
        mem_mb=1000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow gather --prefixes {params.prefixes} --sizes {params.sizes}"
        " --output-dir results/bbbc021/crops 2> {log}"


rule preprocess_bbbc014:
    input:
        table="results/bbbc014/images.parquet",
        images="results/bbbc014/images",
    output:
        arrays=expand("results/bbbc014/crops/{size}.npy", size=PRE014["input_sizes"]),
        index="results/bbbc014/crops/index.parquet",
    params:
        sizes=" ".join(map(str, PRE014["input_sizes"])),
        grid=f"{PRE014['crop_grid'][0]} {PRE014['crop_grid'][1]}",
    log:
        "results/logs/preprocess/bbbc014.log",
    resources:
        mem_mb=3000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow --threads {threads} preprocess-bbbc014 --table {input.table} --sizes {params.sizes}"
        " --grid {params.grid} --output-dir results/bbbc014/crops 2> {log}"
