# Names vulture cannot see used: framework hooks (Keras, http.server) and functions the Snakemake rules
# (workflow/rules/*.smk, not Python files) call. Keras' on_epoch_begin and argparse's formatter_class are
# ignored by name in test_package.
from moaflow.datasets import download, tables
from moaflow.learn import feeder, models
from moaflow.devtools import serve
from moaflow import study, tracking

_ = (models.StudyAugmentation.call, models.StudyAugmentation.compute_output_shape,
     feeder.CropBatches.on_epoch_end, serve._Handler.log_request, serve._Handler.log_message,
     serve._Handler.send_head, serve.StandinServer.daemon_threads, serve.StandinServer.allow_reuse_address)
_ = (study.resolve_plates, study.hyperparameter_schema_path, study.architecture_settings, tracking.start_parent,
     tables.crops_table, download.fetch_published, download.write_receipt)
