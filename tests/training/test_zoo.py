"""Zoo entries on a tiny synthetic run: publish (export + score as served + card), the card's
numbers re-scored, zoo names wherever a bundle is taken, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from synthetic_runs import config, run_data, synthetic_cache

from fewshot.artifacts.bundle import load_bundle
from fewshot.artifacts.embedders import MemoEmbed
from fewshot.artifacts.export import evaluate_embedder
from fewshot.artifacts.zoo import ZooEntry, get_entry, list_entries, render_model_md, resolve_bundle
from fewshot.errors import CheckpointError, ConfigError
from fewshot.training.data import RunData
from fewshot.training.loop import train
from fewshot.workflows.zoo import (
    ZooMismatch,
    entry_table,
    evaluate_entry,
    protocol_description,
    publish,
    rescore,
    score,
    training_recipe,
    verify,
)

ZOO = {"title": "tiny", "summary": "a tiny test model", "intended_use": "tests", "limitations": "none",
       "data_description": "synthetic patterns", "licence": "CC0", "episodes": 600, "query": 5,
       "results": [{"way": 3, "shot": 2, "published": 40.0, "source": "made up"}, {"way": 3, "shot": 1}]}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("zoo-run")
    data = run_data(synthetic_cache(root / "c", n_classes=30, per_class=10))
    cfg = config(root, name="tiny-proto", steps=20, val_every=10, lr=3e-3,
                 extra={"zoo": ZOO, "export": {"calibration_episodes": 20}})
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    train(cfg, data=data, progress=False)
    entry = publish(recipe, root=root / "zoo", data=data, progress=False)
    return {"root": root, "data": data, "recipe": recipe, "entry": entry, "cfg": cfg}


def test_publish_writes_an_entry_whose_card_is_its_numbers(made: dict[str, Any]) -> None:
    entry: ZooEntry = made["entry"]
    for name in ("card.json", "episodes.json", "MODEL.md", "curves.png", "bundle/manifest.json", "bundle/model.onnx"):
        assert (entry.path / name).is_file(), name
    card = entry.card()
    assert (entry.path / "MODEL.md").read_text() == render_model_md(card)
    assert [r["key"] for r in card["results"]] == ["3w2s", "3w1s"]
    for r in card["results"]:
        eps = entry.episodes()[r["key"]]
        assert len(eps) == 600 and r["mean"] == pytest.approx(float(np.mean(eps)))
        assert r["mean"] > 1 / 3 + 0.1  # learned something on unseen classes
        assert abs(r["mean"] - r["learner_mean"]) <= 0.01  # as served within a point of the learner
    segs = card["training"]["segments"]
    assert len(segs) == 1 and segs[0]["end_step"] == 20 and card["training"]["cpu_hours"] > 0
    md = (entry.path / "MODEL.md").read_text()
    assert "20 steps of 4-way 2-shot 3-query episodes (meta-batch 1), adam lr 0.003" in md
    assert "| 3-way 2-shot |" in md and "40.00" in md and "made up" in md and "**yes**" in md


def test_a_card_names_the_protocol_of_its_split(made: dict[str, Any]) -> None:
    assert "Vinyals" in made["entry"].card()["protocol"]["description"]
    data = made["data"]
    lake = publish(made["recipe"], root=made["root"] / "zoo-lake", data=RunData(data.cache, data.splits, "lake"),
                   progress=False)
    said = lake.card()["protocol"]["description"]
    assert "20 evaluation alphabets" in said and "within" in said and "Vinyals" not in said
    assert "evaluation alphabets" not in protocol_description("lake", "val")


def test_scoring_embeds_each_image_once_with_the_served_answers(made: dict[str, Any]) -> None:
    entry, data = made["entry"], made["data"]
    bundle = load_bundle(entry.bundle)
    memo = MemoEmbed(bundle.onnx_embedder.embed)
    kw = {"split": "test", "way": 3, "shot": 2, "query": 5, "episodes": 50, "seed": 1234}
    memoised = score(bundle, data, embed=memo, **kw)
    direct = evaluate_embedder(bundle.onnx_embedder.embed, bundle.decision_rule, data, **kw)
    assert memoised.accuracies == pytest.approx(direct.accuracies)
    n_test = sum(data.cache.classes[i].count for i in data.splits["test"].class_ids)
    assert memo.embedded <= n_test < 50 * 3 * (2 + 5)  # each image once, not once per episode


def test_a_batch_learners_card_names_its_batches_not_episodes(tmp_path: Path) -> None:
    cfg = config(tmp_path, "pretrain", batch_size=32, optimizer="sgd", lr=0.05)
    assert training_recipe(cfg).startswith("batches of 32 labelled images, sgd lr 0.05")
    lake = config(tmp_path, way=6, shot=1, query=2, domain_mode="within", affine=True)
    assert training_recipe(lake).startswith("6-way 1-shot 2-query episodes (meta-batch 1) with classes drawn within one "
                                            "domain, affine distortions, adam")


def test_rescore_reproduces_the_recorded_episodes(made: dict[str, Any]) -> None:
    rows = verify(made["entry"], made["data"], episodes=40)
    assert all(r["max_episode_diff"] < 1e-5 and r["episodes"] == 40 for r in rows)  # the same episodes, answered alike
    full = rescore(made["entry"], made["data"])
    assert [r["mean"] for r in full] == pytest.approx([r["mean"] for r in made["entry"].card()["results"]])


def test_a_card_the_bundle_no_longer_reproduces_fails_naming_both_numbers(made: dict[str, Any], tmp_path: Path) -> None:
    copy = ZooEntry("copy", tmp_path / "copy")
    shutil.copytree(made["entry"].path, copy.path)
    eps = copy.episodes()
    eps["3w2s"] = [0.0 if i < 20 else a for i, a in enumerate(eps["3w2s"])]  # as if the weights had changed
    (copy.path / "episodes.json").write_text(json.dumps(eps))
    with pytest.raises(ZooMismatch, match=r"3w2s: the card says \d+\.\d\d% but its recorded episodes average \d+\.\d\d%"):
        verify(copy, made["data"], episodes=40)
    card = copy.card()
    card["results"][0]["mean"] = float(np.mean(eps["3w2s"]))  # a consistent card, but not what the bundle does
    (copy.path / "card.json").write_text(json.dumps(card))
    with pytest.raises(ZooMismatch, match=r"3w2s: the bundle as served scores \d+\.\d\d% on the first 40 episodes, "
                                          r"the card recorded \d+\.\d\d%"):
        verify(copy, made["data"], episodes=40)


def test_zoo_names_work_wherever_a_bundle_is_taken(made: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot.distill.teacher import load_teacher
    from fewshot.service.models import ModelSpec

    monkeypatch.setenv("FEWSHOT_ZOO", str(made["root"] / "zoo"))
    assert [e.name for e in list_entries()] == ["tiny-proto"]
    bundle = made["entry"].bundle
    assert resolve_bundle("zoo:tiny-proto") == bundle and resolve_bundle("some/folder") == Path("some/folder")
    assert ModelSpec.parse("zoo:tiny-proto").path == bundle
    assert ModelSpec.parse("chars=zoo:tiny-proto") == ModelSpec(bundle, "chars")
    teacher = load_teacher("zoo:tiny-proto", data=made["data"])
    assert teacher.source == "zoo:tiny-proto"  # as named: the same teacher from any checkout's zoo folder
    assert teacher.describe()["weights_sha256"] == load_teacher(bundle, data=made["data"]).describe()["weights_sha256"]
    res = evaluate_entry("zoo:tiny-proto", way=3, shot=2, data=made["data"])
    assert res.episodes == 600 and res.mean == pytest.approx(made["entry"].card()["results"][0]["mean"])
    assert "| zoo:tiny-proto | tiny | 3w2s " in entry_table(list_entries())


def test_an_unknown_zoo_name_lists_the_entries(made: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot.cli import main
    from fewshot.service.models import ModelSpec

    monkeypatch.setenv("FEWSHOT_ZOO", str(made["root"] / "zoo"))
    with pytest.raises(ConfigError, match=r"no zoo entry 'nope' .*entries: tiny-proto"):
        get_entry("zoo:nope")
    with pytest.raises(ConfigError, match="entries: tiny-proto"):
        ModelSpec.parse("zoo:nope")
    assert main(["evaluate", "zoo:nope"]) == 2


def test_publish_never_overwrites_a_committed_entry_on_failure(made: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import fewshot.workflows.zoo as zoo

    with pytest.raises(CheckpointError, match="exists; pass --replace"):
        publish(made["recipe"], root=made["root"] / "zoo", data=made["data"], progress=False)
    before = {p.relative_to(made["entry"].path): p.read_bytes() for p in made["entry"].path.rglob("*") if p.is_file()}

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("scoring failed half-way")

    monkeypatch.setattr(zoo, "score", broken)
    with pytest.raises(RuntimeError, match="half-way"):
        publish(made["recipe"], root=made["root"] / "zoo", data=made["data"], progress=False, replace=True)
    after = {p.relative_to(made["entry"].path): p.read_bytes() for p in made["entry"].path.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in (made["root"] / "zoo").iterdir()] == ["tiny-proto"]  # no staging folder left


def test_publish_exports_with_the_recipes_export_settings(made: dict[str, Any], tmp_path: Path) -> None:
    """Export settings may change after training (they change nothing trained); publish uses the
    recipe's, not the ones saved with the run (which once silently won)."""
    assert load_bundle(made["entry"].path / "bundle").manifest.deployment["views"]["episodes"] == 300
    d = made["cfg"].to_dict()
    d["export"] = {**d["export"], "view_episodes": 40, "views": "auto"}
    recipe = tmp_path / "more-view-episodes.yaml"
    recipe.write_text(yaml.safe_dump(d))
    entry = publish(recipe, root=tmp_path / "zoo", data=made["data"], progress=False, episodes=600)
    assert load_bundle(entry.path / "bundle").manifest.deployment["views"]["episodes"] == 40


def test_publish_refuses_a_recipe_that_is_not_what_the_run_trained(made: dict[str, Any], tmp_path: Path) -> None:
    d = made["cfg"].to_dict()
    d["train"]["lr"] = 0.5
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=r"train.lr: 0.003 -> 0.5"):
        publish(other, root=tmp_path / "zoo", data=made["data"], progress=False)
    d = made["cfg"].to_dict()
    d.pop("zoo")
    (tmp_path / "nozoo.yaml").write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="has no zoo section"):
        publish(tmp_path / "nozoo.yaml", root=tmp_path / "zoo", data=made["data"], progress=False)


def test_the_main_jobs_zoo_check_runs_the_entry_beside_the_model_trained_here(made: dict[str, Any],
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from fewshot.training.data import images_by_class
    from fewshot.workflows.pipeline import zoo_service_check

    monkeypatch.setenv("FEWSHOT_ZOO", str(made["root"] / "zoo"))
    assert "no zoo entry 'absent'" in zoo_service_check("absent", {}, [], {})["skipped"]
    checked = images_by_class(made["data"], "test", limit=3)
    quick = {"accuracy": 0.5, "classify_median_ms": 9.0}
    out = zoo_service_check("tiny-proto", checked, [], quick)
    assert out["entry"] == "zoo:tiny-proto" and out["queries"] == len(checked) * 5  # 10 images a class, 5 taught
    assert out["side_by_side"]["accuracy"] == {"trained_here": 0.5, "zoo:tiny-proto": out["accuracy"]}
    assert out["accuracy"] > 1 / len(checked)  # the entry answers over real HTTP better than chance


def test_a_bundle_folder_is_scored_as_served_on_the_data_it_records(made: dict[str, Any]) -> None:
    from fewshot.artifacts.bundle import Manifest
    from fewshot.workflows.zoo import evaluate_bundle

    bundle = made["entry"].bundle
    recorded = Manifest.read(bundle).source["data"]
    assert recorded["image_size"] == 16 and "root" not in recorded and "cache_dir" not in recorded
    res = evaluate_bundle(bundle, way=3, shot=2, episodes=600, query=5, data=made["data"])
    assert res.mean == pytest.approx(made["entry"].card()["results"][0]["mean"])
