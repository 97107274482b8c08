# One row per field of view (BBBC021) or well (BBBC014): what every later stage reads.


rule bbbc021_image_table:
    input:
        image_csv=f"results/bbbc021/raw/{config['bbbc021']['image_csv']}",
        moa_csv=f"results/bbbc021/raw/{config['bbbc021']['moa_csv']}",
        plates=expand("results/bbbc021/images/{plate}", plate=BBBC021_PLATES),
    output:
        "results/bbbc021/images.parquet",
    params:
        plates=" ".join(BBBC021_PLATES),
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
        "moaflow table bbbc021 --image-csv {input.image_csv} --moa-csv {input.moa_csv}"
        " --image-root results/bbbc021/images --plates {params.plates} {params.taxol}"
        " --output {output} 2> {log}"


rule bbbc014_image_table:
    input:
        "results/bbbc014/images",
    output:
        "results/bbbc014/images.parquet",
    params:
        settings=json.dumps(config["bbbc014"]),
    log:
        "results/logs/image_table/bbbc014.log",
    resources:
        mem_mb=1024,
        runtime=10,
    threads: 1
    conda:
        "../../envs/moaflow.yaml"
    shell:
        "moaflow table bbbc014 --image-root {input} --settings {params.settings:q}"
        " --output {output} 2> {log}"
