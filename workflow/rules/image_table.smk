# One row per field of view (BBBC021) or well (BBBC014): what every later stage reads.


rule bbbc021_image_table:
    input:
        image_csv=verified(BBBC021_IMAGE_CSV),
        moa_csv=verified(BBBC021_MOA_CSV),
        plates=expand(verified("results/bbbc021/images/{plate}"), plate=BBBC021_PLATES),
    output:
        "results/bbbc021/images.parquet",
    params:
        image_csv=lambda wc, input: data_of(input.image_csv),
        moa_csv=lambda wc, input: data_of(input.moa_csv),
        plates=BBBC021_PLATES,
        taxol="" if config["bbbc021"]["taxol_rule"] else "--no-taxol-rule",
    log:
        "results/logs/image_table/bbbc021.log",
    resources:
        mem_mb=2048,
        runtime=10,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow table bbbc021 --image-csv {params.image_csv:q} --moa-csv {params.moa_csv:q}"
        " --image-root results/bbbc021/images --plates {params.plates:q} {params.taxol}"
        " --output {output:q} 2> {log:q}"


rule bbbc014_image_table:
    input:
        verified("results/bbbc014/images"),
    output:
        "results/bbbc014/images.parquet",
    params:
        # only what decides the table's content: a new mirror must not redo it
        settings=json.dumps(
            {k: config["bbbc014"][k] for k in BBBC014_TABLE_KEYS}, sort_keys=True
        ),
    log:
        "results/logs/image_table/bbbc014.log",
    resources:
        mem_mb=1024,
        runtime=10,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow table bbbc014 --image-root results/bbbc014/images --settings {params.settings:q}"
        " --output {output:q} 2> {log:q}"
