# One job per published file: resumable (.part + HTTP Range), mirrors in order,
# verified, renamed into place only when complete.


rule download_bbbc021_metadata:
    output:
        "results/bbbc021/raw/{filename}",
    wildcard_constraints:
        filename=r"BBBC021_v1_[a-z]+\.csv",
    params:
        urls=lambda wc: mirror_urls("bbbc021", wc.filename),
        options=download_args(),
    log:
        "results/logs/download/bbbc021_{filename}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow fetch {params.urls} --output {output} {params.options} 2> {log}"


rule download_bbbc021_plate:
    output:
        "results/bbbc021/raw/BBBC021_v1_images_{plate}.zip",
    params:
        urls=lambda wc: mirror_urls(
            "bbbc021", config["bbbc021"]["archive_pattern"].format(plate=wc.plate)
        ),
        options=download_args(),
    log:
        "results/logs/download/bbbc021_{plate}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=240,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow fetch {params.urls} --kind zip --output {output} {params.options} 2> {log}"


rule extract_bbbc021_plate:
    input:
        archive="results/bbbc021/raw/BBBC021_v1_images_{plate}.zip",
        image_csv=f"results/bbbc021/raw/{config['bbbc021']['image_csv']}",
    output:
        directory("results/bbbc021/images/{plate}"),
    log:
        "results/logs/extract/bbbc021_{plate}.log",
    resources:
        mem_mb=1024,
        runtime=60,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow extract-bbbc021 --archive {input.archive} --image-csv {input.image_csv}"
        " --plate {wildcards.plate} --output {output} 2> {log}"


rule download_bbbc014_file:
    output:
        "results/bbbc014/raw/{filename}",
    wildcard_constraints:
        filename=r"BBBC014_v1_[A-Za-z_]+\.(zip|txt)",
    params:
        urls=lambda wc: mirror_urls("bbbc014", wc.filename),
        kind=lambda wc: "zip" if wc.filename.endswith(".zip") else "file",
        options=download_args(),
    log:
        "results/logs/download/bbbc014_{filename}.log",
    resources:
        downloads=1,
        mem_mb=256,
        runtime=120,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow fetch {params.urls} --kind {params.kind} --output {output} {params.options} 2> {log}"


rule extract_bbbc014:
    input:
        archive=f"results/bbbc014/raw/{config['bbbc014']['archive']}",
        platemap=f"results/bbbc014/raw/{config['bbbc014']['platemap']}",
    output:
        directory("results/bbbc014/images"),
    params:
        member_root=config["bbbc014"]["archive_folder"],
        expected=config["bbbc014"]["expected_images"],
    log:
        "results/logs/extract/bbbc014.log",
    resources:
        mem_mb=1024,
        runtime=30,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow extract-bbbc014 --archive {input.archive} --member-root {params.member_root}"
        " --expected-images {params.expected} --output {output} 2> {log}"
