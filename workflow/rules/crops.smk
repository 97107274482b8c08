# Pre-cropped image sets described by a metadata table (config `crops:`, e.g. the BBBC021 lab subset):
# table -> crop store resized to each architecture's input size -> folds. Training, evaluation, MLflow and
# the report are the same rules as for BBBC021. One rule per dataset: their input sizes differ.

for _name, _crops in CROPS.items():

    rule:
        name:
            f"crops_table_{_name}"
        input:
            metadata=_crops["metadata"],
            images=_crops["images"],
        output:
            f"results/{_name}/images.parquet",
        params:
            # a function: Snakemake would take the file name pattern's braces for wildcards
            settings=crops_settings(_name),
        log:
            f"results/logs/image_table/{_name}.log",
        resources:
            mem_mb=1000,
            runtime=10,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow table crops --image-root {input.images:q} --settings {params.settings:q}"
            " --output {output:q} 2> {log:q}"

    rule:
        name:
            f"preprocess_{_name}"
        input:
            f"results/{_name}/images.parquet",
        output:
            arrays=[f"results/{_name}/crops/{size}.npy" for size in config["preprocess"][_name]["input_sizes"]],
            index=f"results/{_name}/crops/index.parquet",
        params:
            sizes=config["preprocess"][_name]["input_sizes"],
            output_dir=lambda wc, output: os.path.dirname(output.index),
        log:
            f"results/logs/preprocess/{_name}.log",
        resources:
            mem_mb=3000,
            runtime=30,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow --threads {threads} preprocess-crops --table {input:q} --sizes {params.sizes:q}"
            " --output-dir {params.output_dir:q} 2> {log:q}"

    rule:
        name:
            f"folds_{_name}"
        input:
            f"results/{_name}/crops/index.parquet",
        output:
            f"results/{_name}/folds.generated.tsv",
        params:
            variant=TRAIN[_name]["folds"]["variant"],
            validation=TRAIN[_name]["folds"]["validation_compounds"],
            seed=TRAIN[_name]["folds"]["seed"],
            fraction=TRAIN[_name]["folds"]["fraction"],
        log:
            f"results/logs/training/{_name}_folds.log",
        resources:
            mem_mb=1000,
            runtime=5,
        threads: 1
        conda:
            "../../envs/moaflow.yaml"
        shell:
            "moaflow folds crops --index {input:q} --variant {params.variant:q}"
            " --validation-compounds {params.validation:q} --seed {params.seed:q} --fraction {params.fraction:q}"
            " --output {output:q} 2> {log:q}"
