"""Evaluation on hand-made predictions with known answers, and conformal coverage."""

import copy
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moaflow import layout
from moaflow.analysis import conformal, deviations, evaluate

from tests.conftest import DEFAULTS


def _crops(rows):
    """rows: (compound, concentration, replicate, image_number, true, pA, pB)"""
    frame = pd.DataFrame(rows, columns=["compound", "concentration", "replicate", "image_number", "true", "p_A", "p_B"])
    frame["moa"] = frame["true"]
    return frame


def test_treatment_call_is_the_median_of_replicate_medians():
    # Replicate 1: crop medians (0.9, 0.1); replicate 2: (0.3, 0.7); replicate 3: (0.4, 0.6).
    # Median over replicates: A = 0.4, B = 0.6 -> B, although the mean of A over crops is higher.
    crops = _crops([
        ("x", 1.0, 1, 1, "A", 0.95, 0.05), ("x", 1.0, 1, 1, "A", 0.9, 0.1), ("x", 1.0, 1, 2, "A", 0.85, 0.15),
        ("x", 1.0, 2, 3, "A", 0.3, 0.7),
        ("x", 1.0, 3, 4, "A", 0.4, 0.6),
    ])
    treatment = evaluate.aggregate(crops, "treatment")
    assert len(treatment) == 1
    assert treatment.loc[0, "p_A"] == pytest.approx(0.4) and treatment.loc[0, "predicted"] == "B"
    assert crops[["p_A"]].mean().item() > 0.5


def test_image_level_uses_the_median_of_the_fields_crops():
    crops = _crops([("x", 1.0, 1, 1, "A", 0.9, 0.1), ("x", 1.0, 1, 1, "A", 0.2, 0.8), ("x", 1.0, 1, 1, "A", 0.6, 0.4),
                    ("x", 1.0, 1, 2, "A", 0.1, 0.9)])
    image = evaluate.aggregate(crops, "image")
    assert list(image["predicted"]) == ["A", "B"] and image.loc[0, "p_A"] == pytest.approx(0.6)


def test_a_tie_goes_to_the_first_class_like_argmax():
    crops = _crops([("x", 1.0, 1, 1, "B", 0.5, 0.5)])
    assert evaluate.aggregate(crops, "treatment").loc[0, "predicted"] == "A"


def test_a_table_is_evaluated_at_its_own_level_and_coarser_only():
    treatments = pd.DataFrame({"compound": ["x"], "concentration": [1.0], "true": ["A"], "p_A": [0.9], "p_B": [0.1]})
    assert evaluate.level_of(treatments) == "treatment"
    assert evaluate.aggregate(treatments, "treatment").loc[0, "predicted"] == "A"
    with pytest.raises(ValueError, match="treatment level cannot be evaluated at crop level"):
        evaluate.aggregate(treatments, "crop")


def test_confusion_matrix_sums_to_the_number_of_treatments():
    rng = np.random.default_rng(0)
    rows = []
    for t in range(10):
        for replicate in (1, 2, 3):
            p = rng.uniform()
            rows.append((f"c{t % 4}", float(t), replicate, t * 3 + replicate, "A" if t % 2 else "B", p, 1 - p))
    treatment = evaluate.aggregate(_crops(rows), "treatment")
    matrix = evaluate.confusion(treatment, ["A", "B"])
    assert matrix.to_numpy().sum() == 10 == len(treatment)
    assert np.trace(matrix.to_numpy()) / 10 == pytest.approx(evaluate.accuracy(treatment))


def test_per_class_recall():
    frame = pd.DataFrame({"true": ["A", "A", "B", "B"], "predicted": ["A", "B", "B", "B"]})
    assert evaluate.per_class_recall(frame, ["A", "B"]) == {"A": 0.5, "B": 1.0}


def _calibrated(n, rng, k=4):
    """A calibrated classifier: labels are drawn from the predicted probabilities."""
    probabilities = rng.dirichlet(np.ones(k) * 0.7, size=n)
    labels = np.array([rng.choice(k, p=p) for p in probabilities])
    frame = pd.DataFrame(probabilities, columns=[f"p_{c}" for c in "ABCD"[:k]])
    frame["true"] = np.array(list("ABCD"))[labels]
    return frame


@pytest.mark.parametrize("significance", [0.1, 0.2])
def test_mondrian_coverage_on_exchangeable_examples(significance):
    rng = np.random.default_rng(1)
    calibration, test = _calibrated(4000, rng), _calibrated(4000, rng)
    table = conformal.conformal_table(test, calibration, [significance])
    for row in table.itertuples():
        # class-conditional validity: coverage >= 1 - significance, up to 3 standard errors from both
        # random samples (test points, and the calibration set the threshold comes from)
        tolerance = 3 * np.sqrt(significance * (1 - significance) * (1 / row.n + 1 / max(row.n_calibration, 1)))
        assert row.coverage >= 1 - significance - tolerance, row
        assert row.coverage <= 1 - significance + tolerance + 1 / (row.n_calibration + 1), row
    assert table.query("`class` == 'all'")["mean_set_size"].item() < 4


def test_a_class_without_calibration_is_always_in_the_set():
    calibration = pd.DataFrame({"p_A": [0.9, 0.8], "p_B": [0.1, 0.2], "true": ["A", "A"]})
    test = pd.DataFrame({"p_A": [0.99], "p_B": [0.01], "true": ["A"]})
    sets = conformal.conformal_sets(test, conformal.mondrian_calibration(calibration), 0.1)
    assert "B" in sets[0]


def test_several_seeds_give_a_seed_variation_row(tmp_path):
    """Two seeds: one calls every treatment right, the other half of them."""
    folds = pd.DataFrame({"fold": ["x", "y"]})
    for seed, wrong in ((0, set()), (1, {"y"})):
        for fold in ("x", "y"):
            base = Path(layout.fold_dir("lab", "net", "random", seed, fold, root=tmp_path))
            base.mkdir(parents=True)
            true = "A" if fold == "x" else "B"
            p_true = 0.2 if fold in wrong else 0.9
            crops = _crops([(fold, 1.0, r, r, true, p_true if true == "A" else 1 - p_true,
                             p_true if true == "B" else 1 - p_true) for r in (1, 2, 3)])
            crops.assign(crop_id=range(3)).to_parquet(base / "test_predictions.parquet")
            crops.iloc[:0].to_parquet(base / "validation_predictions.parquet")
            pd.DataFrame({"epoch": [1], "test_accuracy": [1.0]}).to_csv(base / "history.tsv", sep="\t", index=False)
    evaluation = evaluate.evaluate_runs("lab", folds, [("net", "random")], seeds=[0, 1], significance_levels=[0.1],
                                        root=tmp_path)
    summary = evaluate.write_evaluation(evaluation, tmp_path / "out")
    assert summary["accuracy"]["net/random"]["treatment"] == pytest.approx(0.75)   # mean of 1.0 and 0.5
    table = pd.read_csv(tmp_path / "out" / "accuracy.csv")
    row = table.query("architecture == 'net' and level == 'treatment'").iloc[0]
    assert row["seeds"] == 2 and row["sd_percent"] == pytest.approx(np.std([100, 50], ddof=1))
    variation = pd.read_csv(tmp_path / "out" / "seed_variation.csv")
    assert sorted(variation.query("level == 'treatment'")["accuracy_percent"]) == [50.0, 100.0]
    # the report's opening table: the network's row, each level as mean ± SD over the seeds
    headline = pd.read_csv(tmp_path / "out" / "headline.csv").set_index("network")
    assert headline.loc["net", "treatment %"] == f"75.0 ± {np.std([100, 50], ddof=1):.1f}"
    assert headline.loc["net", "initialisation"] == "random" and list(headline.columns[:2]) == ["initialisation",
                                                                                               "crop %"]


def test_the_report_opens_with_the_headline_table(tmp_path):
    """The report's first page (workflow/report/workflow.rst, rendered as Snakemake renders it: Jinja, then
    docutils) shows each dataset's headline.csv as a table, before anything else."""
    from types import SimpleNamespace

    import jinja2
    from docutils.core import publish_parts

    path = tmp_path / "results" / "bbbc021" / "evaluation" / "headline.csv"
    path.parent.mkdir(parents=True)
    pd.DataFrame({"network": ["resnet50"], "initialisation": ["imagenet"], "treatment %": ["97.1 ± 1.0"]}).to_csv(
        path, index=False)
    text = (Path(__file__).resolve().parents[2] / "workflow" / "report" / "workflow.rst").read_text()
    config = {"datasets": ["bbbc021"], "bbbc021": {"published_files": {"a": 1, "b": 2}, "image_csv": "a",
                                                    "moa_csv": "b"}}
    files = [SimpleNamespace(target="headline.csv", path=path), SimpleNamespace(target="other.csv", path=path)]
    rendered = jinja2.Environment().from_string(text).render(snakemake=SimpleNamespace(config=config), files=files,
                                                                categories={})
    html = publish_parts(rendered, writer="html")["html_body"]
    assert "Accuracy of every network on bbbc021" in html and html.count("<table") == 1
    assert html.index("<table") < html.index("moaflow reruns") and "97.1 ± 1.0" in html


def _write_fold(tmp_path, dataset, architecture, fold, crops):
    """A trained fold's files as evaluation reads them (hand-made test predictions)."""
    base = Path(layout.fold_dir(dataset, architecture, "random", 0, fold, root=tmp_path))
    base.mkdir(parents=True)
    crops.assign(crop_id=range(len(crops))).to_parquet(base / "test_predictions.parquet")
    crops.iloc[:0].to_parquet(base / "validation_predictions.parquet")
    pd.DataFrame({"epoch": [1], "test_accuracy": [1.0]}).to_csv(base / "history.tsv", sep="\t", index=False)


def test_the_ensemble_row_scores_the_mean_of_the_architectures_probabilities(tmp_path):
    """Each network calls one of two treatments right (50 %); the mean of their probabilities calls both."""
    p_a = {("one", "x"): 0.9, ("one", "y"): 0.6, ("two", "x"): 0.4, ("two", "y"): 0.1}   # x is A, y is B
    for (net, fold), p in p_a.items():
        true = "A" if fold == "x" else "B"
        _write_fold(tmp_path, "lab", net, fold, _crops([(fold, 1.0, r, r, true, p, 1 - p) for r in (1, 2, 3)]))
    evaluation = evaluate.evaluate_runs("lab", pd.DataFrame({"fold": ["x", "y"]}), [("one", "random"),
                                        ("two", "random")], seeds=[0], significance_levels=[0.1], root=tmp_path)
    scores = pd.DataFrame(evaluation.scores).query("level == 'treatment'").set_index("architecture")
    assert scores.loc[["one", "two"], "accuracy_percent"].tolist() == [50.0, 50.0]
    assert scores.loc["ensemble", "accuracy_percent"] == 100.0 and scores.loc["ensemble", "init"] == "random"


def test_bbbc014_calls_a_well_by_the_mean_probability_of_its_crops(tmp_path):
    """Well 1 (positive): crops 0.9, 0.4, 0.4, mean 0.57, called positive although most crops say negative.
    Well 2 (positive): crops 0.45 each, called negative. Well 3 (negative): 0.2 each. Two of three right."""
    p = {"w1": [0.9, 0.4, 0.4], "w2": [0.45] * 3, "w3": [0.2] * 3}
    crops = pd.DataFrame([{"cell_line": "A549", "well": well, "label": int(well != "w3"), "p_positive": q,
                           "p_negative": 1 - q} for well, qs in p.items() for q in qs])
    _write_fold(tmp_path, "bbbc014", "net", "A549", crops)
    headline = evaluate.evaluate_bbbc014(pd.DataFrame({"fold": ["A549"]}), [("net", "random")], tmp_path / "out",
                                         seeds=[0], root=tmp_path)
    assert headline["well_accuracy_percent"] == {"net/random/seed-0/A549": pytest.approx(200 / 3)}
    table = pd.read_csv(tmp_path / "out" / "well_accuracy.csv")
    assert table["wells"].tolist() == [3]


# ----------------------------------------------------------------- published predictions

PUBLISHED = Path(str(resources.files("moaflow") / "data" / "kensert2019_predictions.csv"))


def test_the_authors_predictions_give_the_papers_accuracies_through_moaflow_evaluate(tmp_path):
    """`moaflow evaluate-predictions` on the authors' xlsx (as CSV): 97.09 / 97.09 / 95.15 % and their errors."""
    from moaflow.cli import main as moaflow

    assert moaflow(["evaluate-predictions", "--predictions", str(PUBLISHED), "--out-dir", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "accuracy.csv").query("level == 'treatment'").set_index("architecture")
    assert table["n"].tolist() == [103, 103, 103]
    assert table["accuracy_percent"].round(2).to_dict() == {"inception_resnet_v2": 95.15, "inception_v3": 97.09,
                                                              "resnet50": 97.09}
    wrong = pd.read_csv(tmp_path / "misclassified_treatments.csv")
    found = {(r.architecture, r.compound, float(r.concentration)) for r in wrong.itertuples()}
    expected = {(a, "colchicine", 0.03) for a in ("resnet50", "inception_v3", "inception_resnet_v2")} | \
               {(a, "latrunculin B", 1.0) for a in ("resnet50", "inception_v3", "inception_resnet_v2")} | \
               {("resnet50", "chlorambucil", 10.0), ("inception_v3", "ALLN", 3.0),
                ("inception_resnet_v2", "MG-132", 0.1), ("inception_resnet_v2", "MG-132", 3.0),
                ("inception_resnet_v2", "methotrexate", 10.0)}
    assert found == expected
    assert (tmp_path / "confusion_treatment_resnet50_published.png").is_file()
    assert "image" not in set(pd.read_csv(tmp_path / "accuracy.csv")["level"])   # cannot go finer than the table


# ----------------------------------------------------------------- deviations

def test_deviations_follow_the_preset_and_settings():
    """The defaults are the paper's column: a run with them differs in nothing; changed settings show, each
    architecture's own value where they differ."""
    folds = pd.DataFrame({"fold": [f"c{i}" for i in range(38)], "validation_groups": [""] * 38,
                          "excluded_batches": [""] * 38})
    paper = deviations.describe(deviations.settings_of(DEFAULTS), folds, deviations.PUBLISHED_DATA)
    same = deviations.deviations(deviations.describe(deviations.settings_of(DEFAULTS), folds,
                                                     deviations.PUBLISHED_DATA), paper).set_index("setting")
    assert not same["differs"].any(), same[same["differs"]]
    assert same.loc["empty-crop rule", "paper"] == "at most 0.002 of values above 50"
    changed = copy.deepcopy(DEFAULTS)
    changed["training"]["bbbc021"]["preset"] = "published"
    changed["preprocess"]["bbbc021"]["illumination"]["apply"] = True
    changed["training"]["bbbc021"]["hyperparameters"] = {"precision": "mixed_bfloat16"}
    table = deviations.deviations(deviations.describe(deviations.settings_of(changed), folds,
                                                      deviations.data_description(None)), paper).set_index("setting")
    differs = set(table.index[table["differs"]])
    assert {"epochs", "batch_size", "learning_rate", "precision", "illumination correction", "data"} == differs
    assert table.loc["epochs", "this run"] == "resnet50 5, inception_v3 7, inception_resnet_v2 5"
    assert table.loc["momentum", "this run"] == table.loc["momentum", "paper"] == "0.9"


# ----------------------------------------------------------------- conformal, correlated groups

def _grouped(rng, n_compounds, crops, k=4, spread=1.5):
    """Compounds whose crops share a compound-level shift of their scores (strongly correlated within a
    compound), as crops of one compound are; treatments are compound x 2 concentrations."""
    rows = []
    for c in range(n_compounds):
        label = c % k
        shift = rng.normal(0, spread, k)                     # the compound's own bias, shared by its crops
        for concentration in (1.0, 3.0):
            for r in range(crops):
                logits = shift + rng.normal(0, 0.7, k)
                logits[label] += 1.0
                p = np.exp(logits) / np.exp(logits).sum()
                rows.append((f"c{c}", concentration, 1 + r % 3, f"c{c}-{concentration}-{r}", "ABCD"[label], *p))
    frame = pd.DataFrame(rows, columns=["compound", "concentration", "replicate", "crop_id", "true",
                                        *[f"p_{x}" for x in "ABCD"]])
    return frame.assign(fold=frame["compound"])


@pytest.mark.parametrize("level", ["crop", "treatment"])
def test_cross_conformal_coverage_holds_for_new_compounds(level):
    """Calibrated on the other folds' held-out compounds, coverage of a new compound's crops or treatments
    is 1 - significance within the sampling error of compounds (the unit that is exchangeable)."""
    rng = np.random.default_rng(3)
    held_out = _grouped(rng, n_compounds=240, crops=6)
    table = conformal.cross_conformal(held_out, [0.1, 0.2], level).query("`class` == 'all'")
    for row in table.itertuples():
        tolerance = 3 * np.sqrt(row.significance * (1 - row.significance) / 240) + 0.02
        assert abs(row.coverage - (1 - row.significance)) <= tolerance, row
        assert row.level == level


def test_a_compound_is_never_calibrated_on_its_own_scores():
    """Eleven class-A compounds, one crop each: ten scored p(A) = 0.9, one unlike them all (p(A) = 0.05).
    Calibrated on the other ten, the odd compound's p-value for A is 1/11 <= 0.1, so A is left out of its set
    (coverage 10/11). A leaky calibration that includes the compound's own score gives it 2/12 and covers it."""
    rows = [(f"a{c}", 1.0, 1, f"a{c}", "A", 0.05 if c == 0 else 0.9, 0.95 if c == 0 else 0.1) for c in range(11)]
    rows += [(f"b{c}", 1.0, 1, f"b{c}", "B", 0.1, 0.9) for c in range(11)]
    frame = pd.DataFrame(rows, columns=["compound", "concentration", "replicate", "crop_id", "true", "p_A", "p_B"])
    table = conformal.cross_conformal(frame.assign(fold=frame["compound"]), [0.1], "crop").set_index("class")
    assert table.loc["A", "coverage"] == pytest.approx(10 / 11)
    assert table.loc["B", "coverage"] == 1.0


def test_empty_histories_do_not_break_the_learning_curves(tmp_path):
    evaluate.plot_learning_curves({("net", "published"): [pd.DataFrame(columns=["epoch", "test_accuracy"])]},
                                  tmp_path / "curves.png", "title")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
