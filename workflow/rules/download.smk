# One job per published file, then one per archive to extract. Each job's declared output is a receipt
# (`<data>.verified.json`: size, SHA-256, source, checks) written beside the data it describes. The data
# itself is not a declared output, so Snakemake never deletes a good download or extraction before a
# rerun; the steps reuse what still verifies and replace only with verified data. Downloads run on
# the submit host (localrules): cluster compute nodes often have no internet.


localrules:
    download_bbbc021_metadata,
    download_bbbc021_plate,
    download_bbbc014_file,


rule download_bbbc021_metadata:
    output:
        destination=receipt(layout.raw("bbbc021", "{filename}")),
    log:
        layout.log("download", "bbbc021_{filename}"),
    benchmark:
        layout.benchmark("download_bbbc021_metadata", "bbbc021_{filename}")
    wildcard_constraints:
        filename=r"BBBC021_v1_[a-z]+\.csv",
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        downloads=1,
        mem_mb=1000,
        runtime=30,
    params:
        step="fetch",
        section="bbbc021",
        filename="{filename}",
        published=lambda wc: config["bbbc021"]["published_files"].get(wc.filename),
        kind=lambda wc: {
            config["bbbc021"]["image_csv"]: "image_csv",
            config["bbbc021"]["moa_csv"]: "moa_csv",
        }.get(wc.filename, "text"),
    script:
        "../scripts/fetch.py"


rule download_bbbc021_plate:
    output:
        destination=receipt(layout.raw("bbbc021", "BBBC021_v1_images_{plate}.zip")),
    log:
        layout.log("download", "bbbc021_{plate}"),
    benchmark:
        layout.benchmark("download_bbbc021_plate", "bbbc021_{plate}")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        downloads=1,
        mem_mb=256,
        runtime=240,
    params:
        step="fetch",
        section="bbbc021",
        filename=lambda wc: config["bbbc021"]["archive_pattern"].format(plate=wc.plate),
        published=None,
        kind="zip",
    script:
        "../scripts/fetch.py"


rule extract_bbbc021_plate:
    input:
        archive=receipt(layout.raw("bbbc021", "BBBC021_v1_images_{plate}.zip")),
        image_csv=receipt(BBBC021_IMAGE_CSV),
        moa_csv=receipt(BBBC021_MOA_CSV),
    output:
        target=receipt(layout.plate_images("{plate}")),
    log:
        layout.log("extract", "bbbc021_{plate}"),
    benchmark:
        layout.benchmark("extract_bbbc021_plate", "bbbc021_{plate}")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=1024,
        runtime=60,
    params:
        step="extract-bbbc021",
        plate="{plate}",
        # which fields the study reads: a change extracts what is missing
        taxol_rule=config["bbbc021"]["taxol_rule"],
    script:
        "../scripts/extract.py"


rule download_bbbc014_file:
    output:
        destination=receipt(layout.raw("bbbc014", "{filename}")),
    log:
        layout.log("download", "bbbc014_{filename}"),
    benchmark:
        layout.benchmark("download_bbbc014_file", "bbbc014_{filename}")
    wildcard_constraints:
        filename=r"BBBC014_v1_[A-Za-z_]+\.(zip|txt)",
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        downloads=1,
        mem_mb=256,
        runtime=120,
    params:
        step="fetch",
        section="bbbc014",
        filename="{filename}",
        published=lambda wc: config["bbbc014"]["published_files"].get(wc.filename),
        kind=lambda wc: "zip" if wc.filename.endswith(".zip") else "text",
    script:
        "../scripts/fetch.py"


rule extract_bbbc014:
    input:
        # the plate map is fetched for provenance; labels come from well positions
        receipt(layout.raw("bbbc014", config["bbbc014"]["platemap"])),
        archive=receipt(layout.raw("bbbc014", config["bbbc014"]["archive"])),
    output:
        target=receipt(layout.images_dir("bbbc014")),
    log:
        layout.log("extract", "bbbc014"),
    benchmark:
        layout.benchmark("extract_bbbc014", "bbbc014")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=1024,
        runtime=30,
    params:
        step="extract-bbbc014",
        member_root=config["bbbc014"]["archive_folder"],
        expected_count=config["bbbc014"]["expected_images"],
    script:
        "../scripts/extract.py"
