# Names vulture cannot see used: framework hooks (Keras, http.server, pytest), names the Snakemake rules (not Python
# files) call, and registry entries read by attribute. The steps the rules run by name (moaflow.steps) are
# added by test_package itself. Keras' on_epoch_begin is ignored by name in test_package.
from moaflow import config, layout, study, tracking
from tests import conftest
from moaflow.devtools import serve
from moaflow.learn import architectures, models

_ = (models.StudyAugmentation.call, models.StudyAugmentation.compute_output_shape,
     serve._Handler.log_request, serve._Handler.log_message,
     serve._Handler.send_head, serve.StandinServer.daemon_threads, serve.StandinServer.allow_reuse_address)
_ = (study.resolve_plates, tracking.start_parent, config.crops_datasets, config.moa_datasets,
     config.normalises_to_controls, architectures.paper_architectures, architectures.pretrained,
     layout.generated_folds, layout.job_summary, layout.control_statistics,
     layout.interpretation, layout.mlflow, layout.log, layout.report, layout.illumination_figure, layout.raw,
     layout.plate_images, layout.images_dir, layout.image_table, layout.weights, layout.checkpoints,
     layout.evaluation, layout.profiling, layout.plate_part, layout.store_index, layout.folds)
_ = conftest.pytest_collection_modifyitems, conftest.pytest_xdist_node_collection_finished   # pytest hooks
