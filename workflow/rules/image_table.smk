# One row per field of view (BBBC021) or well (BBBC014): what every later stage reads.


rule bbbc021_image_table:
    input:
        [receipt(layout.plate_images(p)) for p in BBBC021_PLATES],
        image_csv=receipt(BBBC021_IMAGE_CSV),
        moa_csv=receipt(BBBC021_MOA_CSV),
    output:
        output=layout.image_table("bbbc021"),
    log:
        layout.log("image_table", "bbbc021"),
    benchmark:
        layout.benchmark("bbbc021_image_table", "bbbc021")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=2048,
        runtime=10,
    params:
        step="table-bbbc021",
        image_root=lambda wc, input: os.path.dirname(input[0]),
        plates=BBBC021_PLATES,
        taxol_rule=config["bbbc021"]["taxol_rule"],
    script:
        STEP


rule bbbc014_image_table:
    input:
        image_root=receipt(layout.images_dir("bbbc014")),
    output:
        output=layout.image_table("bbbc014"),
    log:
        layout.log("image_table", "bbbc014"),
    benchmark:
        layout.benchmark("bbbc014_image_table", "bbbc014")
    conda:
        "../../envs/moaflow.yaml"
    threads: 1
    resources:
        mem_mb=1024,
        runtime=10,
    params:
        step="table-bbbc014",
        # only what decides the table's content: a new mirror must not redo it
        settings={
            k: config["bbbc014"][k]
            for k in (
                "filename_regex",
                "dapi_channel",
                "cell_lines",
                "positive_columns",
                "negative_columns",
            )
        },
    script:
        STEP
