# One job per published file, then one per archive to extract. Each job's declared output is a receipt
# (`<data>.verified.json`: size, SHA-256, source, checks) written beside the data it describes. The data
# itself is not a declared output, so Snakemake never deletes a good download or extraction before a
# rerun; the scripts reuse what still verifies and replace only with verified data. Downloads run on
# the submit host (localrules): cluster compute nodes often have no internet.

localrules:
    download_bbbc021_metadata,
    download_bbbc021_plate,
    download_bbbc014_file,


rule download_bbbc021_metadata:
    output:
        "results/bbbc021/raw/{filename}.verified.json",
    wildcard_constraints:
        filename=r"BBBC021_v1_[a-z]+\.csv",
    params:
        section="bbbc021",
        filename="{filename}",
        data=lambda wc, output: data_of(output[0]),
        kind=lambda wc: {
            config["bbbc021"]["image_csv"]: "image_csv",
            config["bbbc021"]["moa_csv"]: "moa_csv",
        }.get(wc.filename, "text"),
    log:
        "results/logs/download/bbbc021_{filename}.log",
    resources:
        downloads=1,
        mem_mb=1000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/fetch.py"


rule download_bbbc021_plate:
    output:
        "results/bbbc021/raw/BBBC021_v1_images_{plate}.zip.verified.json",
    params:
        section="bbbc021",
        filename=lambda wc: config["bbbc021"]["archive_pattern"].format(plate=wc.plate),
        data=lambda wc, output: data_of(output[0]),
        kind="zip",
    log:
        "results/logs/download/bbbc021_{plate}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=240,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/fetch.py"


rule extract_bbbc021_plate:
    input:
        archive="results/bbbc021/raw/BBBC021_v1_images_{plate}.zip.verified.json",
        image_csv=f"results/bbbc021/raw/{config['bbbc021']['image_csv']}.verified.json",
    output:
        "results/bbbc021/images/{plate}.verified.json",
    params:
        dataset="bbbc021",
        archive=lambda wc, input: data_of(input.archive),
        image_csv=lambda wc, input: data_of(input.image_csv),
        member_root="{plate}",
        target=lambda wc, output: data_of(output[0]),
    log:
        "results/logs/extract/bbbc021_{plate}.log",
    resources:
        mem_mb=1024,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/extract.py"


rule download_bbbc014_file:
    output:
        "results/bbbc014/raw/{filename}.verified.json",
    wildcard_constraints:
        filename=r"BBBC014_v1_[A-Za-z_]+\.(zip|txt)",
    params:
        section="bbbc014",
        filename="{filename}",
        data=lambda wc, output: data_of(output[0]),
        kind=lambda wc: "zip" if wc.filename.endswith(".zip") else "text",
    log:
        "results/logs/download/bbbc014_{filename}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=120,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/fetch.py"


rule extract_bbbc014:
    input:
        archive=f"results/bbbc014/raw/{config['bbbc014']['archive']}.verified.json",
        platemap=f"results/bbbc014/raw/{config['bbbc014']['platemap']}.verified.json",
    output:
        "results/bbbc014/images.verified.json",
    params:
        dataset="bbbc014",
        archive=lambda wc, input: data_of(input.archive),
        member_root=config["bbbc014"]["archive_folder"],
        expected_count=config["bbbc014"]["expected_images"],
        target=lambda wc, output: data_of(output[0]),
    log:
        "results/logs/extract/bbbc014.log",
    resources:
        mem_mb=1024,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    script:
        "../scripts/extract.py"
