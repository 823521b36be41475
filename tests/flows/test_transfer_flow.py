"""End to end: a real Prefect run, a real MLflow store in a temp dir, a real ONNX Runtime session."""

import json
import math
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mlflow import MlflowClient

from components.common.config import build_config
from components.common.errors import PipelineError
from components.deploy import tracking
from components.deploy.tracking import load_registered
from components.engine.images import (
    Preprocessing,
    eval_pixels,
    normalise,
    open_image,
    preprocess_file,
)
from flows.cli import main
from flows.transfer import plan_flow, transfer_flow

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, cache: Path | None = None, **sections):
    return build_config(
        {
            "output_dir": str(tmp_path / "out"),
            "run": {"cache_dir": None if cache is None else str(cache)},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "similarity": {"sample_size": 32, "bootstrap_rounds": 50},
            "train": {"num_workers": 0},
            "strategy": {"verify": "off"},
            **sections,
        }
    )


def test_flow_goes_from_folder_to_registered_onnx_model(digits_root: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path)  # its own cache: the rerun below must find the features it wrote
    summary = transfer_flow(data=str(digits_root), config=cfg)

    assert summary["case"] == 2 and summary["cut"].startswith("block")  # small and different
    assert summary["similarity"]["score"] < cfg.strategy.similar_threshold
    assert summary["counts"]["total"] == 400
    assert summary["metrics"]["val_accuracy"] > 0.8 and summary["metrics"]["test_accuracy"] > 0.8

    # The ONNX file agrees with the labels it was registered with, on real held-out images.
    uri = cfg.tracking.tracking_uri
    onnx_path, labels, prep = load_registered(summary["model_uri"], uri, tmp_path / "served")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = sorted(digits_root.glob("7/*.png"))[:8]
    batch = np.stack([preprocess_file(p, Preprocessing.from_dict(prep)) for p in images])
    predicted = [labels[i] for i in session.run(None, {"input": batch})[0].argmax(1)]
    assert predicted.count("7") >= 6

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["transfer_pipeline.pid"] == str(os.getpid())
    assert not any((tmp_path / "out" / "checkpoints").glob("*"))  # a finished run leaves none
    assert run.data.params["case"] == "2" and "val_accuracy" in run.data.metrics
    # A frozen head logs its cross-validation curve (one step per penalty on the grid), with the
    # interval of every held-out accuracy beside it.
    curve = client.get_metric_history(run.info.run_id, "head_cv_accuracy")
    assert len(curve) > 1 and all(0 <= m.value <= 1 for m in curve)
    m = run.data.metrics
    assert m["val_accuracy_low"] <= m["val_accuracy"] <= m["val_accuracy_high"]
    assert m["val_n"] == summary["accuracy"]["val"]["n"] > 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {
        "report/decision.md",
        "report/similarity_profile.png",
        "report/confusion_val.png",
    } <= artifacts
    # The first version above the floor is champion; the comparison is logged and tagged.
    name = summary["registered_model"]
    assert name == "digits"
    gate = summary["promotion"]
    assert gate["verdict"] == "promoted-first" and gate["champion_version"] is None
    assert gate["challenger_version"] == 1 and gate["champion_now"] == 1
    assert gate["split"] == "test" and gate["n"] == summary["counts"]["per_split"]["test"]
    assert gate["challenger_accuracy"] == pytest.approx(
        summary["metrics"]["test_accuracy"], abs=0.03
    )
    assert gate["champion_uri"] == "models:/digits@champion"
    for alias in ("challenger", "champion"):
        assert int(client.get_model_version_by_alias(name, alias).version) == 1
    version = client.get_model_version(name, "1")
    assert version.tags["promotion.verdict"] == "promoted-first"
    assert run.data.params["promotion.verdict"] == "promoted-first"
    assert run.data.metrics["gate_promoted"] == 1.0
    assert "promotion.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    report = client.download_artifacts(run.info.run_id, "report/decision.md", str(tmp_path))
    assert "## Promotion" in Path(report).read_text()
    # The training data is the run's dataset input, under the digest the ONNX file records.
    [dataset] = run.inputs.dataset_inputs
    digest = run.data.params["data_digest"]
    assert dataset.dataset.digest == digest and dataset.dataset.name == "digits"
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert props["transfer_pipeline.data_digest"] == digest
    assert (
        props["transfer_pipeline.case"] == "2" and props["transfer_pipeline.cut"] == summary["cut"]
    )
    assert json.loads(props["transfer_pipeline.labels"]) == labels

    # The model's training-data profile is saved next to it and logged with the run.
    profile_dir = Path(summary["run_dir"]) / "profile"
    n_train = summary["counts"]["per_split"]["train"]
    assert json.loads((profile_dir / "profile.json").read_text())["n_images"] == n_train
    assert {a.path for a in client.list_artifacts(run.info.run_id, "profile")} >= {
        "profile/profile.json",
        "profile/profile.npz",
    }

    # A rerun against that profile (retraining on the same data) embeds nothing again, finds the
    # data identical to the profile's and registers version 2.
    again_cfg = cfg.model_copy(
        update={"similarity": cfg.similarity.model_copy(update={"profile": profile_dir})}
    )
    chunks = set((tmp_path / "out" / "cache").rglob("chunk-*"))
    assert chunks  # the first run's features, cached
    again = transfer_flow(data=str(digits_root), config=again_cfg)
    assert again["model_version"] == 2
    assert set((tmp_path / "out" / "cache").rglob("chunk-*")) == chunks  # nothing computed again
    sim = again["similarity"]
    assert sim["profile"]["score"] > 0.9 and sim["bn_score"] < 0.5
    assert sim["score"] == pytest.approx(sim["bn_score"] ** 0.5 * sim["profile"]["score"] ** 0.5)
    # Version 2 was judged against version 1 on the same test images.
    gate = again["promotion"]
    assert gate["champion_version"] == 1 and gate["n"] == summary["promotion"]["n"]
    assert gate["champion_accuracy"] == pytest.approx(summary["promotion"]["challenger_accuracy"])
    assert gate["verdict"] in ("promoted-better", "promoted-no-worse", "rejected-worse")
    assert gate["champion_now"] == (2 if gate["promote"] else 1)
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2

    # A run that fails after registering its version moves no alias.
    def broken(*args, **kwargs):
        raise PipelineError("injected failure after registration")

    champion_before = gate["champion_now"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tracking, "tag_version", broken)
        with pytest.raises(PipelineError, match="injected"):
            transfer_flow(data=str(digits_root), config=cfg, force=True)
    failed = client.get_model_version(name, "3")
    assert client.get_run(failed.run_id).info.status == "FAILED"
    assert int(client.get_model_version_by_alias(name, "champion").version) == champion_before
    assert int(client.get_model_version_by_alias(name, "challenger").version) == 2
    assert mlflow.get_tracking_uri() != uri  # the gate's fluent evaluation put the URI back


def test_verification_trains_the_runner_up_on_a_nested_split(
    digits_root: Path, tmp_path: Path, shared_cache: Path
) -> None:
    # A budget no size fits: the fine-tune takes the cheapest candidate (the runner-up at a size
    # of its own is tested in tests/components/training/test_training.py, on cheaper inputs).
    strategy = {"verify": "on", "finetune_budget_s": 1}
    train = {"num_workers": 0, "finetune_epochs": 1}
    cfg = _config(tmp_path, shared_cache, strategy=strategy, train=train)
    summary = transfer_flow(data=str(digits_root), config=cfg)
    v = summary["verification"]
    assert v["rule_case"] == 2 and v["runner_up"] == 4
    n_train = summary["counts"]["per_split"]["train"]
    assert set(v["inner_accuracy"]) == {"2", "4"}
    assert v["n_inner_val"] == math.ceil(0.2 * n_train)  # strategy.verify_fraction
    lead = v["inner_accuracy"]["4"] - v["inner_accuracy"]["2"]
    assert v["tie"] == (abs(lead) <= v["margin"])
    # digits are unlike the source: a tie goes to the fine-tune when it scored at least as well
    assert summary["case"] == v["chosen_case"] == (4 if lead >= 0 else 2)
    assert "nested split" in summary["reason"]
    # The size was probed for the frozen case 2; the fine-tuned runner-up trained at the size its
    # budget gives, and the final model at its own case's size.
    final = summary["resolution"]
    assert final["method"] == ("budget" if summary["case"] == 4 else "probe")
    assert summary["image_size"] == final["chosen"] == v["image_size"][str(summary["case"])]
    assert v["image_size"]["4"] == min(c["size"] for c in final["candidates"])  # the cheapest
    if summary["case"] == 4:  # the probe's measurement is kept beside the budget's choice
        assert final["frozen"]["method"] == "probe"
        assert final["frozen"]["chosen"] == v["image_size"]["2"]
        assert f"{final['chosen']} px, the cheapest" in final["reason"]
    report = Path(summary["report"]).read_text()
    assert "Verification against the runner-up case" in report and "| 4" in report


def test_plans_are_deterministic_for_a_fixed_seed(
    digits_root: Path, tmp_path: Path, shared_cache: Path
) -> None:
    cfg = _config(tmp_path, shared_cache, strategy={"verify": "auto"})
    first, second = (plan_flow(data=str(digits_root), config=cfg) for _ in range(2))
    varying = {"run_dir", "report", "seconds", "stage_seconds", "verification", "resolution"}
    assert {k: v for k, v in first.items() if k not in varying} == {
        k: v for k, v in second.items() if k not in varying
    }
    assert first["probe"]["means"] == second["probe"]["means"]
    # Both sizes were measured (small images: the rule's 64 px against the native 224 px), with
    # the same scores both times; only the measured seconds vary.
    scores = [
        [(c["size"], c["probe_accuracy"]) for c in run["resolution"]["candidates"]]
        for run in (first, second)
    ]
    assert scores[0] == scores[1] and [size for size, _ in scores[0]] == [64, 224]
    assert (
        first["resolution"]["method"] == "probe"
        and first["resolution"]["chosen"] == first["image_size"]
    )
    # the verification preview says what a run would do and why, and trains nothing
    preview = first["verification"]
    # 28 digits per class is far below the size threshold, yet fine-tuning them is cheap: the
    # check's committed cost fits the budget, so a run would verify case 4.
    assert preview["runner_up"] == 4 and preview["run"] and "fits" in preview["reason"]
    assert preview["estimated_seconds"] <= preview["budget_seconds"]
    assert not (Path(first["run_dir"]) / "verification").exists()


def test_cli_json_summary_and_plan(
    digits_root: Path, tmp_path: Path, shared_cache: Path, capsys
) -> None:
    """A usable dataset with a few bad files: they are listed, and the good ones still train."""
    data = tmp_path / "digits-with-bad-files"
    shutil.copytree(digits_root, data)
    good = (data / "3" / "0001.png").read_bytes()
    (data / "3" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "__MACOSX" / "3").mkdir(parents=True)
    (data / "__MACOSX" / "3" / "._0001.png").write_bytes(good)  # clutter: ignored, counted
    (data / "5" / "notes.png").write_text("not an image")
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(json.dumps(_config(tmp_path, shared_cache).model_dump(mode="json")))
    assert main(["plan", "--data", str(data), "--config", str(cfg_file), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"case", "cut", "reason", "similarity", "counts", "thresholds"} <= set(plan)
    assert plan["thresholds"]["similar_threshold"] == 0.5 and "metrics" not in plan
    quarantined = {Path(q["path"]).name: q["reason"] for q in plan["quarantined"]}
    assert set(quarantined) == {"truncated.png", "notes.png"}
    assert plan["counts"]["total"] == 400
    assert plan["scan"]["layout"] == "classes" and plan["scan"]["clutter"] == {"__MACOSX": 1}

    code = main(
        [
            "run",
            "--data",
            str(digits_root),
            "--config",
            str(cfg_file),
            "--case",
            "1",
            "--json",
            "--set",
            "export.embed_preprocessing=true",
        ]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["case"] == 1 and summary["overridden"]
    for key in (
        "case",
        "reason",
        "similarity",
        "counts",
        "metrics",
        "onnx_path",
        "mlflow_run_id",
        "model_version",
        "promotion",
        "seconds",
    ):
        assert key in summary
    assert Path(summary["onnx_path"]).is_file()
    assert {"verdict", "champion_version", "challenger_version", "p_value"} <= set(
        summary["promotion"]
    )
    # The uint8 NHWC graph, normalisation inside, agrees with the float graph on real images.
    prep = Preprocessing.from_dict(
        json.loads(
            {p.key: p.value for p in onnx.load(summary["onnx_path"]).metadata_props}[
                "transfer_pipeline.preprocessing"
            ]
        )
    )
    images = sorted(digits_root.glob("4/*.png"))[:5]
    pixels = np.stack([eval_pixels(open_image(p, keep_grey=True), prep) for p in images])
    uint8 = ort.InferenceSession(summary["onnx_uint8_path"], providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(summary["onnx_path"], providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        uint8.run(None, {"input": pixels})[0],
        plain.run(None, {"input": normalise(pixels, prep)})[0],
        rtol=1e-4,
        atol=1e-4,
    )


def test_cli_stops_with_a_clear_message_on_bad_data(tmp_path: Path, capsys) -> None:
    cfg_file = tmp_path / "pipeline.yaml"
    cfg_file.write_text(json.dumps(_config(tmp_path).model_dump(mode="json")))
    code = main(["run", "--data", str(tmp_path / "nowhere"), "--config", str(cfg_file)])
    assert code == 2
    assert "nowhere does not exist" in capsys.readouterr().err


def test_plan_sets_held_out_near_copies_aside(tmp_path: Path) -> None:
    """A JPEG q70 copy of a training photo in val is quarantined before any stage uses val."""
    from PIL import Image

    photos = Path(__file__).parents[1] / "data" / "ants_bees"
    root = tmp_path / "leaky"
    for label in ("ants", "bees"):
        files = sorted((photos / label).glob("*.jpg"))
        for i, src in enumerate(files[:8]):
            split = "train" if i < 6 else "val"
            (root / split / label).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, root / split / label / src.name)
    copy = root / "val" / "ants" / "copy.jpg"
    Image.open(sorted((photos / "ants").glob("*.jpg"))[0]).save(copy, quality=70)
    summary = plan_flow(data=str(root), config=_config(tmp_path))
    found = summary["near_duplicates"]
    assert found["n_quarantined"] == 1 and found["n_cross_split"] == 1
    assert [q["path"] for q in summary["quarantined"]] == [str(copy)]
    assert "(leakage)" in summary["quarantined"][0]["reason"]
    assert summary["counts"]["per_split"]["val"] == 4
    assert Path(found["contact_sheet"]).is_file()
    validation = json.loads(
        (Path(summary["run_dir"]) / "validation" / "validation.json").read_text()
    )
    usable = Path(validation["report"]["usable_manifest_path"])
    assert usable.name == "usable_manifest_deduplicated.csv" and str(copy) not in usable.read_text()


def test_plan_keeps_near_copies_in_one_split_when_it_draws_the_splits(tmp_path: Path) -> None:
    """Class folders: the pipeline draws the splits, so a near-copy and its original are put in
    the same split rather than the held-out one being quarantined: nothing is lost, nothing leaks."""
    import pandas as pd
    from PIL import Image

    photos = Path(__file__).parents[1] / "data" / "ants_bees"
    root = tmp_path / "classes"
    for label in ("ants", "bees"):
        (root / label).mkdir(parents=True)
        for i, src in enumerate(sorted((photos / label).glob("*.jpg"))):
            shutil.copy(src, root / label / src.name)
            if i < 6:  # JPEG q70 re-encodes: each should end in its original's split
                Image.open(src).save(root / label / f"copy-{src.name}", quality=70)
    summary = plan_flow(data=str(root), config=_config(tmp_path))
    found = summary["near_duplicates"]
    assert found["n_pairs"] >= 12 and found["n_quarantined"] == 0 and found["n_moved"] >= 1
    assert found["n_cross_split"] == 0 and found["largest_group"] >= 2
    assert summary["quarantined"] == [] and summary["counts"]["total"] == 44
    validation = json.loads(
        (Path(summary["run_dir"]) / "validation" / "validation.json").read_text()
    )
    usable = pd.read_csv(validation["report"]["usable_manifest_path"])
    split_of = dict(zip(usable["path"], usable["split"], strict=True))
    group_of = dict(zip(usable["path"], usable["group"], strict=True))
    for label in ("ants", "bees"):
        for copy in (root / label).glob("copy-*.jpg"):
            original = root / label / copy.name.removeprefix("copy-")
            assert split_of[str(copy)] == split_of[str(original)], copy
            # and one group key, which keeps them in one fold wherever train is split again
            assert group_of[str(copy)] == group_of[str(original)] == f"{label}/{original.name}"
