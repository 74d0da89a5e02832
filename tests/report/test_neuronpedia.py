"""Neuronpedia export: the upload payload checked against a copy of Neuronpedia's field lists."""

from __future__ import annotations

import json

from gradsae.report.neuronpedia import neuronpedia_upload, write_neuronpedia

# Copied from Neuronpedia's Python library (``neuronpedia/requests/feature_request.py``, ``upload_batch``,
# and ``np_feature.py``'s ``Logit``): the payload of ``POST /api/feature/upload-batch``.
UPLOAD = {"modelId": str, "source": str, "features": list}
FEATURE_REQUIRED = {"index": int, "density": float, "activations": list, "topLogits": list, "bottomLogits": list}
FEATURE_OPTIONAL = {"explanations": list}
ACTIVATION_REQUIRED = {"tokens": list, "values": list}
ACTIVATION_OPTIONAL = {"quantileMax", "quantileMin", "quantileFraction"}
LOGIT = {"token": str, "value": float}


def _typed(value: object, kind: type) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) if kind is float else isinstance(value, kind)


def check_upload(payload: dict) -> list[str]:
    """Every way ``payload`` breaks the upload schema (empty: valid)."""
    wrong = [f"top-level keys {sorted(payload)}"] if set(payload) != set(UPLOAD) else []
    wrong += [f"{k} is not {t.__name__}" for k, t in UPLOAD.items() if not _typed(payload.get(k), t)]
    for f in payload.get("features", []):
        where = f"feature {f.get('index')}"
        extra = set(f) - set(FEATURE_REQUIRED) - set(FEATURE_OPTIONAL)
        wrong += [f"{where}: extra keys {sorted(extra)}"] if extra else []
        wrong += [f"{where}: {k} missing or wrong" for k, t in FEATURE_REQUIRED.items() if not _typed(f.get(k), t)]
        wrong += [f"{where}: no activation"] if not f.get("activations") else []
        for act in f.get("activations", []):
            if set(act) - set(ACTIVATION_REQUIRED) - ACTIVATION_OPTIONAL or not set(ACTIVATION_REQUIRED) <= set(act):
                wrong.append(f"{where}: activation keys {sorted(act)}")
            elif len(act["tokens"]) != len(act["values"]) or not all(_typed(v, float) for v in act["values"]):
                wrong.append(f"{where}: tokens and values differ")
        for logit in [*f.get("topLogits", []), *f.get("bottomLogits", [])]:
            if set(logit) != set(LOGIT) or not all(_typed(logit[k], t) for k, t in LOGIT.items()):
                wrong.append(f"{where}: logit {logit}")
    return wrong


def test_the_checker_rejects_the_old_feature_shape():
    old = {"modelId": "m", "layer": "0-gradsae-res", "index": 3, "n_prompts_total": 4, "activations": []}
    assert check_upload(old) and check_upload({"modelId": "m", "source": "0-x", "features": [old]})


def test_upload_payload_matches_neuronpedias_schema(tiny_run, tmp_path):
    payload = neuronpedia_upload(tiny_run.cards, model_id="tiny-model", source_set="my-saes")
    assert check_upload(payload) == []
    assert (payload["modelId"], payload["source"]) == ("tiny-model", "0-my-saes")
    fired = [c for c in tiny_run.cards.cards if c.top_activation]
    assert [f["index"] for f in payload["features"]] == [c.latent for c in fired] and fired
    for feature, card in zip(payload["features"], fired, strict=True):
        assert feature["density"] == card.density
        assert [x["token"] for x in feature["topLogits"]] == [t for t, _ in card.promoted]
        assert feature["activations"][0]["values"] == list(card.top_activation[0].activation)
    written = json.loads(write_neuronpedia(tmp_path / "np.json", tiny_run.cards).read_text())
    assert written["modelId"] == tiny_run.cards.model and check_upload(written) == []
